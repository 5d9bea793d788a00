"""The seed papers' experiments (issues 8 and 20): --aug across scripts, --budget-flops and summary.json, SimCLR with
K random negatives, SimCLR-abs and SimCLR-sq, VICReg-exp and VICReg-ctr, BYOL's component ablations."""

import importlib
import json
import math

import pytest
import torch
from conftest import METHODS, TINY, run_script
from test_scripts import read_log

import common
import simclr
import vicreg

# views each script consumes: two-view methods 2, MAE 1, DINO all (2 global + --local-crops at 16 px here)
EXPECTED = {"simclr": [32] * 2, "byol": [32] * 2, "vicreg": [32] * 2, "mae": [32], "dino": [32] * 2}


class Captured(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("recipe", list(common.RECIPES))
def test_every_recipe_gives_each_script_its_views(method, recipe, monkeypatch, tmp_path):
    """The script's own main() up to its data loader, with --aug RECIPE: the views it would train on."""

    def capture(args, env, views):
        raise Captured(views)

    monkeypatch.setattr(common, "train_loader", capture)
    script = importlib.import_module(method)
    argv = ["--arch", "vit_tiny", "--img-size", "32", "--patch-size", "8", "--aug", recipe, "--out", str(tmp_path)]
    with pytest.raises(Captured) as views:
        script.main(argv + (["--local-crops", "2"] if method == "dino" else []))
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    out = views.value.args[0](img)
    expected = EXPECTED[method] + ([16, 16] if method == "dino" and recipe.startswith("dino") else [])
    assert [v.shape[-1] for v in out] == expected and all(v.shape[:2] == (3, v.shape[-1]) for v in out)
    assert all(v.dtype == torch.float32 for v in out)


def test_noise_only_keeps_the_whole_image_and_adds_noise():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    a, b = common.make_views("noise-only", 32)(img)
    clean = common.normalize_batch(img[None])[0]
    std = torch.tensor(common.IMAGENET_STD)[:, None, None]
    assert not torch.equal(a, b) and ((a - clean) * std).std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.slow
def test_budget_flops_sets_the_length_and_summary_json(tmp_path):
    flags = [*TINY, "--knn-every", 0, "--warmup-epochs", 0.5]
    run_script("simclr.py", *flags, "--epochs", 1, "--out", tmp_path / "one")
    per_step = read_log(tmp_path / "one")[0]["flops"] / 2  # the first record is at step 2
    budget = 5.5 * per_step
    run_script("simclr.py", *flags, "--epochs", 1000, "--budget-flops", budget, "--out", tmp_path / "budget")
    log = read_log(tmp_path / "budget")
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["flops"] == 5 * per_step <= budget < 6 * per_step
    assert summary["images_seen"] == 5 * 32 and summary["method"] == "simclr" and summary["arch"] == "resnet18"
    assert summary["wall_time_s"] == log[-1]["time"] > 0 and summary["knn_top1"] is None
    assert [r["epoch"] for r in log if "loss" not in r] == [0, 1]  # 4 steps per epoch: 5 steps touch 2 epochs
    # the cosine spans the 5 budgeted steps (warmup 2), not 1000 epochs: the lr of step 5 (index 4)
    peak = 1e-3 * 32 / 256
    assert log[-2]["step"] == 5 and log[-2]["lr"] == pytest.approx(common.cosine_schedule(4, 5, 2, peak))
    assert log[-2]["lr"] < 0.5 * peak


def nt_xent_sampled_loop(z1, z2, temperature, negatives, seed):
    """Each anchor keeps the `negatives` negatives with the highest uniform random score (scores drawn as one
    (2N, 2N) matrix from `seed`), then -log(exp(s_pos) / (exp(s_pos) + sum over kept negatives exp(s_neg)))."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    two_n = len(z)
    torch.manual_seed(seed)
    score = torch.rand(two_n, two_n)
    total = 0.0
    for a in range(two_n):
        p = (a + two_n // 2) % two_n
        candidates = sorted((b for b in range(two_n) if b not in (a, p)), key=lambda b: -score[a, b].item())
        sim = [float(z[a] @ z[b]) / temperature for b in range(two_n)]
        denominator = math.exp(sim[p]) + sum(math.exp(sim[b]) for b in candidates[:negatives])
        total += -math.log(math.exp(sim[p]) / denominator)
    return total / (two_n // 2)  # loss_a + loss_b, the official scale


@pytest.mark.parametrize("negatives", [1, 3])
def test_nt_xent_with_k_random_negatives_matches_loop(negatives):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    torch.manual_seed(7)
    got = simclr.nt_xent(z1, z2, 0.5, negatives).item()
    assert got == pytest.approx(nt_xent_sampled_loop(z1, z2, 0.5, negatives, seed=7), rel=1e-6)
    # all 2N-2 negatives is the plain NT-Xent
    assert simclr.nt_xent(z1, z2, 0.5, 10).item() == pytest.approx(simclr.nt_xent(z1, z2, 0.5).item(), rel=1e-9)


def test_one_negative_on_orthogonal_embeddings():
    """Orthonormal embeddings, identical views: every negative has similarity 0 and the positive 1, so the loss
    with K negatives is log(1 + K exp(-1/t)) per anchor whichever negatives are drawn: twice that at the official
    scale (loss_a + loss_b)."""
    z = torch.eye(8)[:4]
    for k in (1, 2, 6):
        assert simclr.nt_xent(z, z, 0.5, k).item() == pytest.approx(2 * math.log(1 + k * math.exp(-2)), rel=1e-5)


def simclr_similarity_loop(z1, z2, temperature, similarity):
    """Garrido et al. 2023's SimCLR-abs / SimCLR-sq, anchor by anchor: -log(exp(s_p / t) / (exp(s_p / t) +
    sum over the 2N-2 negatives exp(f(s_k) / t))) with f = |.| or (.)^2 on the negatives only, summed over the
    anchors and divided by N (loss_a + loss_b). Scalar torch ops in float64, so autograd gives its gradients."""
    f = {"cos": lambda s: s, "abs": abs, "sq": lambda s: s * s}[similarity]
    z = torch.cat([z1, z2])
    two_n = len(z)
    total = 0.0
    for a in range(two_n):
        p = (a + two_n // 2) % two_n
        cosine = [z[a] @ z[b] / (z[a].norm() * z[b].norm()) for b in range(two_n)]
        negatives = [torch.exp(f(cosine[b]) / temperature) for b in range(two_n) if b not in (a, p)]
        positive = torch.exp(cosine[p] / temperature)
        total = total - torch.log(positive / (positive + sum(negatives)))
    return total / (two_n // 2)


@pytest.mark.parametrize("similarity", ["abs", "sq"])
@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_simclr_abs_and_sq_match_loop_with_gradients(similarity, temperature):
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    got = simclr.nt_xent(a1, a2, temperature, similarity=similarity)
    got.backward()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    want = simclr_similarity_loop(b1, b2, temperature, similarity)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # nt_xent computes in float32
    assert torch.allclose(a1.grad, b1.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a2.grad, b2.grad, rtol=1e-5, atol=1e-6)
    # the variant changes the loss, and the plain loop is the plain NT-Xent
    assert got.item() != pytest.approx(simclr.nt_xent(z1, z2, temperature).item(), rel=1e-3)
    cos = simclr_similarity_loop(z1, z2, temperature, "cos").item()
    assert cos == pytest.approx(simclr.nt_xent(z1, z2, temperature).item(), rel=1e-6)


def test_simclr_abs_and_sq_push_negatives_to_orthogonal_not_opposite():
    """Two images with identical views, their embeddings opposite (e, -e) or orthogonal (e1, e2); every anchor has
    its positive at s = 1 and two negatives at s = -1 or 0. By hand, per anchor at temperature t: opposite, cos
    log(1 + 2 exp(-2/t)) (the best NT-Xent can do) but abs and sq log(3) (as bad as a negative at s = 1);
    orthogonal, all three log(1 + 2 exp(-1/t)). loss_a + loss_b is twice the per-anchor mean."""
    t = 0.5
    opposite, orthogonal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.eye(2)
    assert simclr.nt_xent(opposite, opposite, t).item() == pytest.approx(2 * math.log(1 + 2 * math.exp(-2 / t)))
    for similarity in ("abs", "sq"):
        assert simclr.nt_xent(opposite, opposite, t, similarity=similarity).item() == pytest.approx(2 * math.log(3))
    for similarity in ("cos", "abs", "sq"):
        got = simclr.nt_xent(orthogonal, orthogonal, t, similarity=similarity).item()
        assert got == pytest.approx(2 * math.log(1 + 2 * math.exp(-1 / t)))


def test_simclr_similarity_flag_reaches_the_loss():
    args = simclr.get_args([*map(str, TINY), "--similarity", "sq", "--mlp", "64-32", "--amp", "off"])
    torch.manual_seed(0)
    model = simclr.SimCLR(args)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, _ = model(views)
    z1, z2 = model.projector(model.backbone(torch.cat(views))).chunk(2)
    assert loss.item() == pytest.approx(simclr.nt_xent(z1, z2, args.temperature, similarity="sq").item(), rel=1e-6)
    assert loss.item() != pytest.approx(simclr.nt_xent(z1, z2, args.temperature).item(), rel=1e-3)


def vicreg_variant_loop(z1, z2, variant, tau):
    """Garrido et al. 2023: VICReg-exp replaces the covariance term by (1/d) sum_i log sum_{j!=i} exp(C_ij/tau)
    per branch; VICReg-ctr is VICReg-exp on the transposed embedding matrices (invariance unchanged)."""
    n, d = z1.shape
    invariance = float(((z1 - z2) ** 2).sum()) / (n * d)
    variance = repulsion = 0.0
    for z in (z1, z2):
        k = z.T if variant == "ctr" else z  # rows: the samples the statistics run over
        rows, cols = k.shape
        mean = [sum(float(k[r, c]) for r in range(rows)) / rows for c in range(cols)]
        cov = [[sum((float(k[r, i]) - mean[i]) * (float(k[r, j]) - mean[j]) for r in range(rows)) / (rows - 1)
                for j in range(cols)] for i in range(cols)]  # fmt: skip
        variance += sum(max(0.0, 1 - math.sqrt(cov[i][i] + 1e-4)) for i in range(cols)) / cols / 2
        lse = [math.log(sum(math.exp(cov[i][j] / tau) for j in range(cols) if j != i)) for i in range(cols)]
        repulsion += sum(lse) / cols
    return invariance, variance, repulsion


@pytest.mark.parametrize("variant", ["exp", "ctr"])
def test_vicreg_variants_match_loop(variant):
    torch.manual_seed(0)
    z1, z2 = 0.5 * torch.randn(7, 5, dtype=torch.float64), 0.5 * torch.randn(7, 5, dtype=torch.float64)
    unit = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]  # each coefficient alone picks out its term
    for coefficients, want in zip(unit, vicreg_variant_loop(z1, z2, variant, 0.2)):
        got = vicreg.vicreg_loss(z1, z2, *coefficients, variant=variant, temperature=0.2)
        assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("ablation", [["--ema", 0], ["--predictor", 0]])
def test_byol_ablations_train(ablation, tmp_path):
    """Morningstar et al.'s component ablations: no target network (SimSiam's stop-gradient form), no predictor."""
    flags = [*TINY, "--mlp", "64-32", "--epochs", 1, "--knn-every", 0, *ablation]
    run_script("byol.py", *flags, "--out", tmp_path)
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("target.") for k in model) == (ablation[0] != "--ema")
    assert any(k.startswith("predictor.") for k in model) == (ablation[0] != "--predictor")
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path) if "loss" in r)
