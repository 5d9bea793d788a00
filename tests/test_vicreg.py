"""vicreg.py: the loss against plain loops over the official code's formulas, and 2 processes against 1."""

import pytest
import torch
from conftest import spawn

import vicreg


def vicreg_loop(z1, z2, sim=25.0, std=25.0, cov=1.0):
    """Official normalisation: mse over n and d; per-dimension std hinge halved per branch; squared off-diagonal
    covariance / d per branch."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    invariance = sum(float((z1[i, j] - z2[i, j]) ** 2) for i in range(n) for j in range(d)) / (n * d)
    variance = covariance = 0.0
    for z in (z1, z2):
        mean = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
        for j in range(d):
            var = sum((float(z[i, j]) - mean[j]) ** 2 for i in range(n)) / (n - 1)
            variance += max(0.0, 1 - (var + 1e-4) ** 0.5) / d / 2
            for k in range(d):
                if k != j:
                    c = sum((float(z[i, j]) - mean[j]) * (float(z[i, k]) - mean[k]) for i in range(n)) / (n - 1)
                    covariance += c * c / d
    return sim * invariance + std * variance + cov * covariance, (invariance, variance, covariance)


def test_vicreg_loss_matches_loop():
    torch.manual_seed(0)
    z1, z2 = 0.5 * torch.randn(9, 6), 0.5 * torch.randn(9, 6)  # std below 1: the hinge is active
    expected, terms = vicreg_loop(z1, z2)
    assert vicreg.vicreg_loss(z1, z2).item() == pytest.approx(expected, rel=1e-5)
    unit = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]  # each coefficient alone picks out its term
    for coefficients, want in zip(unit, terms):
        assert vicreg.vicreg_loss(z1, z2, *coefficients).item() == pytest.approx(want, rel=1e-5)
    assert vicreg.vicreg_loss(z1, z2, 1.0, 2.0, 3.0).item() == pytest.approx(vicreg_loop(z1, z2, 1, 2, 3)[0], rel=1e-5)


def _vicreg_rank(rank, world, z1, z2):
    n = len(z1) // world
    a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = vicreg.vicreg_loss(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def test_two_processes_match_one():
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = vicreg.vicreg_loss(f1, f2)
    full.backward()
    results = spawn(_vicreg_rank, 2, z1, z2)
    assert torch.stack([r[0] for r in results]).mean().item() == pytest.approx(full.item(), rel=1e-5)
    for rank, (_, g1, g2) in enumerate(results):
        part = slice(rank * 4, (rank + 1) * 4)
        assert torch.allclose(g1.double(), 2 * f1.grad[part], atol=1e-5)
        assert torch.allclose(g2.double(), 2 * f2.grad[part], atol=1e-5)


def test_expander_shape():
    head = vicreg.mlp(512, [64, 64, 32])
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert head[-1].bias is None and head(torch.randn(5, 512)).shape == (5, 32)
