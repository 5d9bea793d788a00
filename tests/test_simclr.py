"""simclr.py: NT-Xent against a plain loop written from the paper's formula, and the projector's shape."""

import math

import pytest
import torch
import torch.nn.functional as F

import simclr


def nt_xent_loop(z1, z2, tau):
    """Paper §2.1: l(i,j) = -log exp(sim(i,j)/tau) / sum_{k != i} exp(sim(i,k)/tau), at the official code's scale:
    loss_a + loss_b, the mean over the first views' anchors plus the mean over the second views'."""
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    sim = [[float(z[a] @ z[b] / (z[a].norm() * z[b].norm())) for b in range(n2)] for a in range(n2)]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denominator = sum(math.exp(sim[i][k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[i][j] / tau) / denominator)
    loss_a_plus_loss_b = total / (n2 // 2)  # twice the paper's mean over 2N anchors
    return loss_a_plus_loss_b


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_loop(tau):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert simclr.nt_xent(z1, z2, tau).item() == pytest.approx(nt_xent_loop(z1, z2, tau), rel=1e-5)


def test_nt_xent_is_low_for_aligned_views_and_gradients_flow():
    torch.manual_seed(0)
    z1 = torch.randn(16, 8, requires_grad=True)
    aligned = simclr.nt_xent(z1, z1 + 0.01 * torch.randn(16, 8), 0.1)
    shuffled = simclr.nt_xent(z1, z1[torch.randperm(16)], 0.1)
    assert aligned < shuffled
    aligned.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


def test_projector_official_head():
    head = simclr.mlp(512, [512, 128])
    out = head(torch.randn(10, 512))
    assert out.shape == (10, 128)
    assert not head[-1].bias.requires_grad and torch.all(head[-1].bias == 0)  # the last BN has no beta
    assert head[0].bias is None and head[3].bias is None
    assert F.normalize(out, dim=1).shape == (10, 128)


@pytest.mark.parametrize(
    "arch, width, hidden", [("resnet50", 1.0, 2048), ("resnet50", 2.0, 4096), ("resnet18", 1.0, 512)]
)
def test_default_projector_follows_the_encoders_width(arch, width, hidden):
    """The official head's hidden layer is as wide as the encoder's output (4096 for a ResNet-50 2x)."""
    args = simclr.get_args(["--arch", arch, "--width", str(width), "--img-size", "32"])
    net = simclr.SimCLR(args)
    linears = [m for m in net.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(hidden, hidden), (hidden, 128)]
