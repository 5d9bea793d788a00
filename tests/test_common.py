"""common.py against independent references: LARS by hand, schedules by formula, gather across processes."""

import math
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import torchvision.models.resnet as tv_blocks
from conftest import spawn
from torch import nn

import common


def test_lars_two_steps_match_hand_computation():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = [(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    lr, wd, eta, m = 0.5, 0.1, 0.001, 0.9
    pw, pb = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    opt = common.LARS([pw, pb], lr=lr, weight_decay=wd, momentum=m, eta=eta)
    # by hand, in numpy: decay then trust ratio for the matrix; the 1-D bias gets neither
    W, B = w.numpy().copy(), b.numpy().copy()
    mu_w, mu_b = np.zeros_like(W), np.zeros_like(B)
    for gw, gb in grads:
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw.numpy() + wd * W
        d = d * (eta * np.linalg.norm(W) / np.linalg.norm(d))
        mu_w, mu_b = m * mu_w + d, m * mu_b + gb.numpy()
        W, B = W - lr * mu_w, B - lr * mu_b
    np.testing.assert_allclose(pw.detach().numpy(), W, rtol=1e-12)
    np.testing.assert_allclose(pb.detach().numpy(), B, rtol=1e-12)


def test_lars_eta_and_clip_match_hand_computation():
    """solo-learn's LARS settings (eta 0.02, clip_lr as apex's LARC): a layer's rate is min(trust, lr) instead of
    lr x trust. One matrix is large against its gradient (trust above the lr: its rate is the lr), one small (its
    rate is its trust ratio); the lr changes between the steps, as a schedule does."""
    torch.manual_seed(0)
    big, small = 10 * torch.randn(4, 4, dtype=torch.float64), 0.01 * torch.randn(4, 4, dtype=torch.float64)
    grads = [(0.01 * torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)) for _ in range(2)]
    wd, eta, m = 1e-4, 0.02, 0.9
    pb, ps = nn.Parameter(big.clone()), nn.Parameter(small.clone())
    opt = common.LARS([pb, ps], lr=1.0, weight_decay=wd, momentum=m, eta=eta, clip=True)
    P = [big.numpy().copy(), small.numpy().copy()]
    mu = [np.zeros_like(P[0]), np.zeros_like(P[1])]
    clipped = []
    for lr, (g_big, g_small) in zip((1.0, 0.5), grads):
        common.set_lr(opt, lr)
        pb.grad, ps.grad = g_big.clone(), g_small.clone()
        opt.step()
        for k, g in enumerate((g_big.numpy(), g_small.numpy())):
            d = g + wd * P[k]
            trust = eta * np.linalg.norm(P[k]) / np.linalg.norm(d)
            clipped.append(trust > lr)
            mu[k] = m * mu[k] + d * min(trust / lr, 1)  # then the step lr x mu: the rate min(trust, lr)
            P[k] = P[k] - lr * mu[k]
    assert clipped == [True, False, True, False]
    np.testing.assert_allclose(pb.detach().numpy(), P[0], rtol=1e-12)
    np.testing.assert_allclose(ps.detach().numpy(), P[1], rtol=1e-12)


def test_lars_clip_without_weight_decay_is_solo_learns_update():
    """With wd 0 the trust ratios agree, and one step equals solo-learn's (Lightning Bolts') LARS written out:
    rate = eta ||p|| / (||g|| + eps), clipped to min(rate / lr, 1), then p - lr x rate x g."""
    torch.manual_seed(1)
    for scale in (10.0, 0.01):  # clipped, then not
        w, g = scale * torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        p = nn.Parameter(w.clone())
        p.grad = g.clone()
        common.LARS([p], lr=0.5, weight_decay=0.0, eta=0.02, clip=True).step()
        rate = min(0.02 * w.norm() / (g.norm() + 1e-8) / 0.5, 1.0)
        torch.testing.assert_close(p.detach(), w - 0.5 * rate * g, rtol=1e-7, atol=0)


def test_lars_flags_reach_the_optimizer():
    import byol

    args = byol.get_args(["--lars-eta", "0.02", "--lars-clip", "1"])
    opt = common.build_optimizer(args, common.Env(torch.device("cpu")), nn.Linear(3, 3), lr=1.0)
    assert opt.defaults["eta"] == 0.02 and opt.defaults["clip"] is True
    assert byol.get_args([]).lars_eta == 0.001 and not byol.get_args([]).lars_clip  # the official LARS by default


def test_lars_zero_weight_uses_unit_trust_ratio():
    p = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    p.grad = torch.ones(2, 2, dtype=torch.float64)
    common.LARS([p], lr=0.1, weight_decay=0.0).step()
    assert torch.allclose(p.detach(), torch.full((2, 2), -0.1, dtype=torch.float64))


def test_cosine_schedule_values():
    def f(step):
        return common.cosine_schedule(step, total_steps=110, warmup_steps=10, peak=2.0, final=0.2)

    assert f(0) == 0.0
    assert f(5) == pytest.approx(1.0)
    assert f(10) == pytest.approx(2.0)
    assert f(60) == pytest.approx(1.1)  # half-way through the cosine: the mean of peak and final
    assert f(35) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.2)


def _gather_nt_xent(rank, world, z1, z2, temperature, similarity):
    import simclr

    n = z1.shape[0] // world
    a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = simclr.nt_xent(a, b, temperature, similarity=similarity)
    loss.backward()
    gathered = common.gather(a.detach())
    return loss.detach(), a.grad, b.grad, gathered


@pytest.mark.parametrize("similarity", ["cos", "sq"])  # sq: SimCLR-sq keeps each anchor's positive by global index
def test_gather_two_processes_match_full_batch(similarity):
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    import simclr

    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = simclr.nt_xent(f1, f2, 0.3, similarity=similarity)
    full.backward()
    results = spawn(_gather_nt_xent, 2, z1, z2, 0.3, similarity)
    assert torch.allclose(torch.stack([r[0] for r in results]).mean(), full.detach().float(), atol=1e-6)
    for rank, (_, g1, g2, gathered) in enumerate(results):
        part = slice(rank * 4, (rank + 1) * 4)
        # each rank's loss over its own anchors, with DDP's averaging, equals the full-batch loss:
        # so its gradient is world_size x the full-batch gradient, including the part sent from the other rank
        assert torch.allclose(g1, 2 * f1.grad[part], atol=1e-6)
        assert torch.allclose(g2, 2 * f2.grad[part], atol=1e-6)
        assert torch.equal(gathered, z1)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert common.gather(x) is x


def make_args(**kw):
    base = {"arch": "resnet18", "width": 1.0, "img_size": 32, "stem": "auto", "patch_size": 4, "zero_init_residual": 0}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet_state_dict_loads_into_torchvision(stem):
    net = common.build_backbone(make_args(stem=stem))
    tv = torchvision.models.resnet18()
    if stem == "cifar":  # the CIFAR stem: 3x3 stride-1 first conv, no max-pool
        tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    result = tv.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    tv.fc = nn.Identity()
    net.eval(), tv.eval()
    assert torch.allclose(net(x), tv(x))


def test_vit_uses_timm_names_and_interpolates_position_embeddings():
    vit = common.build_backbone(make_args(arch="vit_tiny", img_size=32, patch_size=4))
    names = set(vit.state_dict())
    for key in [
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.11.norm2.weight",
        "blocks.11.mlp.fc1.weight",
        "blocks.11.mlp.fc2.bias",
        "norm.weight",
    ]:
        assert key in names
    assert vit.pos_embed.shape == (1, 1 + 64, 192)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit.patch_pos_embed(8, 8), vit.pos_embed[:, 1:])
    assert vit.embed(x).shape == (2, 64, 192) and vit(x).shape == (2, 192)
    small = vit.embed(torch.randn(2, 3, 16, 16))  # a local crop: 4x4 patches, position embeddings resized
    assert small.shape == (2, 16, 192)
    assert vit.encode(vit.embed(x)[:, :10]).shape == (2, 11, 192)  # any subset of tokens (MAE's visible patches)


def test_synthetic_is_deterministic_and_uint8():
    a, b = common.SyntheticTextures(20, 32, seed=3), common.SyntheticTextures(20, 32, seed=3)
    img, label = a[7]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 7
    assert torch.equal(img, b[7][0]) and not torch.equal(img, common.SyntheticTextures(20, 32, seed=4)[7][0])


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    views = common.make_views("simclr", 32)
    ds = common.Augmented(common.SyntheticTextures(10, 32, seed=0), views, seed=1)
    torch.manual_seed(123)
    a = ds[(2, 5)][0]
    torch.manual_seed(456)  # the global RNG must not matter, nor be changed
    state = torch.get_rng_state()
    b = ds[(2, 5)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], ds[(3, 5)][0][0])
    assert a[0].dtype == torch.float32 and a[0].shape == (3, 32, 32)


def test_blur_kernel_is_about_a_tenth_of_the_side():
    assert common.blur_kernel(224) == 23 and common.blur_kernel(96) == 9 and common.blur_kernel(32) == 3


def test_knn_predict_weighted_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.1, 1.0]])
    # k=3: class 1 gets exp(cos/T) of its one neighbour, which outweighs two far class-0 votes at T=0.07
    assert common.knn_predict(train, labels, test, k=3).tolist() == [1]
    assert common.knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), k=2).tolist() == [0]


def test_flop_count_of_a_linear_layer_and_state_restored():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, views):
            return self.fc2(self.bn(self.fc1(views[0]))).square().mean(), {}

    net = Tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flops = common.flop_count(net, [torch.randn(16, 8)])
    # matmuls of 2*n*in*out FLOPs: forward fc1, fc2; backward fc2 weight and input grads, fc1 weight grad only
    # (the images need no gradient)
    fc1, fc2 = 2 * 16 * 8 * 4, 2 * 16 * 4 * 2
    assert flops == fc1 + fc2 + 2 * fc2 + fc1
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("arch, last_norm", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_the_last_norm_of_every_block(arch, last_norm):
    """--zero-init-residual 1: the last BatchNorm's weight of each block is 0 (each block starts as the identity),
    every other BatchNorm keeps weight 1; 0 is torchvision's init. At width 0.5 too (its blocks are rebuilt)."""
    for width in (1.0, 0.5):
        args = make_args(arch=arch, width=width, zero_init_residual=1)
        zeroed, plain = common.build_backbone(args), common.build_backbone(make_args(arch=arch, width=width))
        blocks = [m for m in zeroed.modules() if isinstance(m, (tv_blocks.BasicBlock, tv_blocks.Bottleneck))]
        assert len(blocks) == (8 if arch == "resnet18" else 16)
        last = {id(getattr(b, last_norm).weight) for b in blocks}
        for weight in (m.weight for m in zeroed.modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.all(weight == (0 if id(weight) in last else 1))
        assert all(torch.all(m.weight == 1) for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_zero_init_residual_defaults_follow_each_official_code():
    import byol
    import dino
    import simclr
    import vicreg

    defaults = {m.METHOD: m.get_args([]).zero_init_residual for m in (simclr, byol, vicreg, dino)}
    assert defaults == {"simclr": 1, "byol": 1, "vicreg": 1, "dino": 0}


def test_width_multiplier_scales_every_resnet_layer():
    """--width: SimCLR's ResNet-50 (2x) has 94M parameters (SimCLR paper Table 6); a half-width
    ResNet-18 has channels 32-64-128-256 in both stems and a 256-d output; width 1 is torchvision's network."""
    wide = common.build_backbone(make_args(arch="resnet50", width=2.0, stem="imagenet", img_size=224))
    assert wide.embed_dim == 4096 and sum(p.numel() for p in wide.parameters()) == pytest.approx(94e6, rel=0.01)
    for stem in ("imagenet", "cifar"):
        half = common.build_backbone(make_args(width=0.5, stem=stem))
        convs = [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
        assert half.conv1.out_channels == 32 and sorted(set(convs)) == [32, 64, 128, 256]
        assert half(torch.randn(2, 3, 32, 32)).shape == (2, half.embed_dim) == (2, 256)
    plain = common.build_backbone(make_args(stem="imagenet"))
    reference = torchvision.models.resnet18()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in reference.parameters()) - 513 * 1000
    with pytest.raises(common.UserError, match="--width"):
        common.check_args(SimpleNamespace(dataset="synthetic", arch="vit_tiny", width=0.5, amp="off", stem="auto",
                                          img_size=32, patch_size=4))  # fmt: skip


def _stop_after_a_signal_to_rank_1(rank, world):
    stop = common.Preemption(
        SimpleNamespace(ckpt_every=0, out="run"), common.Env(torch.device("cpu"), world, rank), 4, 8
    )
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    due = stop.checkpoint_due(1)
    try:
        stop.stop_if_signalled(1)
    except common.Preempted as e:
        return due, str(e)
    finally:
        common.restore_signal_handlers()
    return due, None


def test_the_processes_agree_on_a_stop_signal_one_of_them_received():
    """Under torchrun a signal may reach one process only: all of them must checkpoint after the same step."""
    expected = (
        True,
        f"stopped by SIGUSR1 after step 1: {os.path.join('run', 'checkpoint.pt')} is written; the same command resumes",
    )
    assert spawn(_stop_after_a_signal_to_rank_1, 2) == [expected, expected]


def test_checkpoints_within_an_epoch_every_n_steps_and_after_a_stop_signal():
    stop = common.Preemption(SimpleNamespace(ckpt_every=3, out="run"), common.Env(torch.device("cpu")), 4, 12)
    try:
        assert [step for step in range(1, 13) if stop.checkpoint_due(step)] == [3, 6, 9]  # 12 ends an epoch
        stop.stop_if_signalled(5)  # no signal yet: nothing happens
        os.kill(os.getpid(), signal.SIGTERM)
        assert all(stop.checkpoint_due(step) for step in (1, 2, 4))
        with pytest.raises(common.Preempted, match="stopped by SIGTERM after step 7: "):
            stop.stop_if_signalled(7)
        stop.stop_if_signalled(12)  # the last step: the run ends normally
    finally:
        common.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_bf16_where_the_cpu_has_it_and_the_first_line_says_so(native, monkeypatch, capsys):
    monkeypatch.setattr(common, "native_bf16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert common.amp_dtype(SimpleNamespace(amp="auto"), cpu) == (torch.bfloat16 if native else None)
    assert common.amp_dtype(SimpleNamespace(amp="auto"), cuda) == torch.bfloat16
    assert [common.amp_dtype(SimpleNamespace(amp=a), cpu) for a in ("off", "bf16", "fp16")] == [
        None,
        torch.bfloat16,
        torch.float16,
    ]
    amp, scaler = common.autocast(SimpleNamespace(amp="auto"), common.Env(cpu))
    with amp():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    assert not scaler.is_enabled()
    common.init(SimpleNamespace(seed=0, amp="auto"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"1 process(es) on cpu, {'bf16 autocast' if native else 'fp32'} (--amp auto: " + (
        "native bf16 on this CPU)" if native else "no native bf16 on this CPU)"
    )
    common.init(SimpleNamespace(seed=0, amp="off"))
    assert capsys.readouterr().out.splitlines()[0] == "1 process(es) on cpu, fp32"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="the CPU flags are read from /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say():
    with open("/proc/cpuinfo") as f:
        flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    assert common.native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
