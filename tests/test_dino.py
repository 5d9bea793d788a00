"""dino.py: the loss against a plain loop, the center across processes, the teacher, multi-crop shapes."""

import math

import pytest
import torch
from conftest import spawn

import common
import dino


def dino_loss_loop(student_out, teacher_out, center, tau_s, tau_t):
    """Paper Eq. 3 with the official centering: mean over pairs (global crop u, any crop v != u) of the batch
    mean of H(P_t(u), P_s(v)) = -sum_k P_t log P_s."""
    B = len(teacher_out) // 2
    V = len(student_out) // B
    total, pairs = 0.0, 0
    for u in range(2):
        for v in range(V):
            if u == v:
                continue
            h = 0.0
            for b in range(B):
                t = [(float(x) - float(c)) / tau_t for x, c in zip(teacher_out[u * B + b], center[0])]
                s = [float(x) / tau_s for x in student_out[v * B + b]]
                zt, zs = math.log(sum(math.exp(x) for x in t)), math.log(sum(math.exp(x) for x in s))
                h += -sum(math.exp(ti - zt) * (si - zs) for ti, si in zip(t, s))
            total, pairs = total + h / B, pairs + 1
    return total / pairs


@pytest.mark.parametrize("crops", [2, 5])
def test_dino_loss_matches_loop(crops):
    torch.manual_seed(0)
    student, teacher, center = torch.randn(crops * 3, 7), torch.randn(2 * 3, 7), 0.1 * torch.randn(1, 7)
    got = dino.dino_loss(student, teacher, center, 0.1, 0.04).item()
    assert got == pytest.approx(dino_loss_loop(student, teacher, center, 0.1, 0.04), rel=1e-5)


def test_no_gradient_reaches_the_teacher_output():
    student, teacher = torch.randn(8, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    dino.dino_loss(student, teacher, torch.zeros(1, 5), 0.1, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


def _center_rank(rank, world, teacher_out, center):
    n = len(teacher_out) // world
    return dino.update_center(center, teacher_out[rank * n : (rank + 1) * n], 0.9)


def test_update_center_two_processes_equal_the_global_mean():
    torch.manual_seed(0)
    teacher_out, center = torch.randn(8, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    expected = 0.9 * center + 0.1 * teacher_out.mean(0)
    assert torch.allclose(dino.update_center(center, teacher_out, 0.9).double(), expected, atol=1e-6)
    for result in spawn(_center_rank, 2, teacher_out, center):
        assert torch.allclose(result.double(), expected, atol=1e-6)


def test_teacher_temperature_warmup():
    args = dino.get_args([])
    assert dino.teacher_temperature(args, 0) == pytest.approx(0.04)
    assert dino.teacher_temperature(args, 29) == pytest.approx(0.07)
    assert dino.teacher_temperature(args, 15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert dino.teacher_temperature(args, 80) == pytest.approx(0.07)
    args.warmup_teacher_temp_epochs = 0  # the official code's default: flat
    assert dino.teacher_temperature(args, 0) == pytest.approx(0.07)


def tiny_dino(arch="vit_tiny"):
    flags = ["--arch", arch, "--img-size", "32", "--mlp", "32-16", "--out-dim", "40", "--local-crops", "3"]
    args = dino.get_args(flags)
    args.patch_size = 8
    return dino.DINO(args), args


def test_multi_crop_shapes_and_a_vit_step():
    torch.manual_seed(0)
    augment = common.make_views("dino", 32, 0, local_crops=3, patch=8)
    assert augment.sizes == [32, 32, 16, 16, 16]  # local crops: 96/224 of 32 px, a multiple of the patch
    views = augment(common.SyntheticTextures(1, 32, 0)[0][0])
    assert [v.shape[-1] for v in views] == augment.sizes
    net, _ = tiny_dino()
    assert net.backbone.embed(torch.randn(2, 3, 16, 16)).shape == (2, 4, 192)  # position embeddings resized
    batch = [torch.stack([v] * 2) for v in views]
    loss, scalars = net(batch)
    loss.backward()
    assert torch.isfinite(loss) and scalars["teacher_temp"] == pytest.approx(0.04)
    assert not torch.equal(net.center, torch.zeros_like(net.center))  # updated after the loss
    assert all(p.grad is None and not p.requires_grad for p in net.teacher.parameters())
    assert net.head.last_layer.parametrizations.weight.original0.grad is None  # norm_last_layer: g frozen at 1


def test_teacher_starts_as_a_copy_and_follows_the_ema():
    torch.manual_seed(0)
    net, _ = tiny_dino("resnet18")
    student = torch.nn.Sequential(net.backbone, net.head).state_dict()
    assert all(torch.equal(v, student[k]) for k, v in net.teacher.state_dict().items())
    with torch.no_grad():
        for p in net.head.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in net.teacher.state_dict().items()}
    common.ema_update(net.teacher, [net.backbone, net.head], 0.99)
    key = "1.mlp.0.weight"
    assert torch.allclose(net.teacher.state_dict()[key], 0.99 * before[key] + 0.01 * (before[key] + 1.0), atol=1e-6)


@pytest.mark.parametrize("bn", [0, 1])
def test_head_layers_and_init(bn):
    """The official DINOHead: Linear (BN with --bn-in-head) GELU per hidden width, a Linear to the bottleneck,
    every Linear trunc-normal(0.02) with zero bias; then the weight-normalised prototypes, norms at 1."""
    torch.manual_seed(0)
    args = dino.get_args(["--mlp", "512-512-64", "--out-dim", "40", "--bn-in-head", str(bn)])
    head = dino.DINOHead(256, args)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == (["Linear", "BatchNorm1d", "GELU"] * 2 if bn else ["Linear", "GELU"] * 2) + ["Linear"]
    for layer in [m for m in head.mlp if isinstance(m, torch.nn.Linear)]:
        assert abs(layer.weight.std().item() - 0.02) < 0.002  # (truncated at +-2, absolute, as the official code)
        assert not layer.bias.any()
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(40))
    out = head(torch.randn(8, 256))
    assert out.shape == (8, 40) and out.abs().max() <= 1 + 1e-5  # cosines: unit bottleneck, unit prototypes
