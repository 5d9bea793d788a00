"""byol.py: the loss against a plain loop, no gradient into the targets, the EMA update by hand."""

import pytest
import torch

import byol
import common


def byol_loss_loop(p1, p2, z1, z2):
    """Paper §3.1: ||p/|p| - z'/|z'|||^2 = 2 - 2 cos(p, z'), both directions, mean over the batch."""
    total = 0.0
    for i in range(len(p1)):
        for p, z in ((p1[i], z2[i]), (p2[i], z1[i])):
            total += float(((p / p.norm() - z / z.norm()) ** 2).sum())
    return total / len(p1)


def test_byol_loss_matches_loop():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(7, 5) for _ in range(4))
    assert byol.byol_loss(p1, p2, z1, z2).item() == pytest.approx(byol_loss_loop(p1, p2, z1, z2), rel=1e-5)
    assert byol.byol_loss(z2, z1, z1, z2).item() == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_reaches_the_targets():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 3, requires_grad=True) for _ in range(4))
    byol.byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None


def tiny_byol():
    args = byol.get_args(["--arch", "resnet18", "--stem", "imagenet", "--img-size", "32", "--mlp", "32-16"])
    return byol.BYOL(args)


def test_target_gets_no_gradient_and_is_not_optimised():
    torch.manual_seed(0)
    net = tiny_byol()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, _ = net(views)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in net.target.parameters())
    assert all(p.grad is not None for p in net.predictor.parameters())
    args = byol.get_args(["--optimizer", "lars", "--wd", "0"])
    optimizer = common.build_optimizer(args, common.Env(torch.device("cpu")), net, lr=0.1)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in net.target.parameters()}


def test_ema_update_by_hand_for_parameters_and_buffers():
    torch.manual_seed(0)
    net = tiny_byol()
    net([torch.randn(4, 3, 32, 32)] * 2)  # move the BN running statistics away from their init
    online = {
        **{f"0.{k}": v.clone() for k, v in net.backbone.state_dict().items()},
        **{f"1.{k}": v.clone() for k, v in net.projector.state_dict().items()},
    }
    before = {k: v.clone() for k, v in net.target.state_dict().items()}
    assert online.keys() == before.keys()
    common.ema_update(net.target, [net.backbone, net.projector], 0.9)
    after = net.target.state_dict()
    for key in ("0.conv1.weight", "0.bn1.running_mean", "0.bn1.running_var", "1.0.weight", "1.1.running_mean"):
        assert torch.allclose(after[key], 0.9 * before[key] + 0.1 * online[key], atol=1e-6), key
    assert torch.equal(after["0.bn1.num_batches_tracked"], online["0.bn1.num_batches_tracked"])


def test_ema_momentum_schedule_first_and_last_step():
    def tau(step, total, base):  # as in main()
        return 1 - common.cosine_schedule(step, total, 0, 1 - base)

    assert tau(0, 1000, 0.996) == pytest.approx(0.996)
    assert tau(500, 1000, 0.996) == pytest.approx(0.998)
    assert tau(1000, 1000, 0.996) == pytest.approx(1.0)


def test_ema_0_is_simsiams_form_the_online_projections_under_stop_gradient():
    """--ema 0: no target network; the targets are the online network's own projections, which pass no gradient
    (checked against a reference whose targets come from a no-grad forward of the same modules)."""
    args = byol.get_args(
        ["--arch", "resnet18", "--stem", "imagenet", "--img-size", "32", "--mlp", "32-16", "--ema", "0"]
    )
    torch.manual_seed(0)
    net = byol.BYOL(args).eval()  # running statistics: both forwards see the same BatchNorm
    assert net.target is None and not any(k.startswith("target.") for k in net.state_dict())
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, _ = net(views)
    loss.backward()
    grads = [p.grad.clone() for p in net.backbone.parameters()]
    net.zero_grad()
    with torch.no_grad():
        z1, z2 = (net.projector(net.backbone(v)) for v in views)
    p1, p2 = (net.predictor(net.projector(net.backbone(v))) for v in views)
    reference = byol_loss_loop(p1.detach(), p2.detach(), z1, z2)
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    byol.byol_loss(p1, p2, z1, z2).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, net.backbone.parameters(), strict=True))


def test_predictor_0_predicts_with_the_projection_itself():
    args = byol.get_args(["--arch", "resnet18", "--stem", "imagenet", "--img-size", "32", "--mlp", "32-16"])
    no_predictor = byol.get_args(["--arch", "resnet18", "--stem", "imagenet", "--img-size", "32", "--mlp", "32-16",
                                  "--predictor", "0", "--ema", "0"])  # fmt: skip
    assert len(list(byol.BYOL(args).predictor.parameters())) > 0
    torch.manual_seed(0)
    net = byol.BYOL(no_predictor).eval()
    assert not list(net.predictor.parameters())
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, _ = net(views)
    with torch.no_grad():
        z1, z2 = (net.projector(net.backbone(v)) for v in views)
    # no predictor and no target: 2 - 2 cos(z1, z2) in both directions, 4 - 4 cos per image
    assert loss.item() == pytest.approx(float((4 - 4 * torch.cosine_similarity(z1, z2)).mean()), rel=1e-5)
