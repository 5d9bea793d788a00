"""mae.py: patchify against a loop over patches, masking, the loss against a loop, and a short run."""

import json
import math

import pytest
import torch
from conftest import TINY, merge_flags, run_script

import mae


def test_patchify_matches_loop_and_unpatchify_inverts_it():
    torch.manual_seed(0)
    imgs, p = torch.randn(2, 3, 8, 12), 4
    patches = mae.patchify(imgs, p)
    assert patches.shape == (2, 6, 48)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                # official order within a patch: rows, then columns, then channels
                want = [float(imgs[n, c, i * p + r, j * p + q]) for r in range(p) for q in range(p) for c in range(3)]
                assert patches[n, i * 3 + j].tolist() == pytest.approx(want)
    square = torch.randn(2, 3, 8, 8)
    assert torch.equal(mae.unpatchify(mae.patchify(square, 4), 4), square)


def test_random_masking_counts_and_restore():
    torch.manual_seed(0)
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    kept, mask, ids_restore = mae.random_masking(x, 0.75)
    assert kept.shape == (2, int(10 * 0.25), 3)
    assert mask.shape == (2, 10) and mask.sum(1).tolist() == [8.0, 8.0]
    for n in range(2):
        visible = x[n][mask[n] == 0]  # the kept tokens, in their original order
        assert sorted(kept[n].tolist()) == sorted(visible.tolist())
        # ids_restore puts the shuffled sequence (kept first) back in the original order
        shuffled = torch.cat([kept[n], x[n][mask[n] == 1][: 10 - len(kept[n])]])
        order = ids_restore[n].argsort()
        assert torch.equal(x[n][order][: len(kept[n])], kept[n]) and shuffled.shape == x[n].shape


def mae_loss_loop(imgs, pred, mask, p, norm_pix):
    target = mae.patchify(imgs, p)
    total, count = 0.0, 0
    for n in range(target.shape[0]):
        for i in range(target.shape[1]):
            if mask[n, i] == 0:
                continue
            t = [float(v) for v in target[n, i]]
            if norm_pix:
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            total += sum((float(a) - b) ** 2 for a, b in zip(pred[n, i], t)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_loop_and_ignores_visible_patches(norm_pix):
    torch.manual_seed(0)
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    got = mae.mae_loss(imgs, pred, mask, 4, norm_pix).item()
    assert got == pytest.approx(mae_loss_loop(imgs, pred, mask, 4, norm_pix), rel=1e-5)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # predictions of visible patches do not count
    assert mae.mae_loss(imgs, changed, mask, 4, norm_pix).item() == pytest.approx(got, rel=1e-6)


def test_sincos_position_embeddings():
    table = mae.sincos_pos_embed(8, 3)  # 2 frequencies per half: omega = 1, 1/100
    assert table.shape == (1, 10, 8) and torch.equal(table[0, 0], torch.zeros(8))
    row, col = 1, 2  # patch 5 of a 3x3 grid
    want = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    want += [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert table[0, 1 + row * 3 + col].tolist() == pytest.approx(want, abs=1e-6)


def test_mae_model_encodes_visible_patches_only():
    args = mae.get_args(["--arch", "vit_tiny", "--img-size", "32", "--decoder-dim", "32", "--decoder-depth", "1"])
    args.patch_size = 8
    net = mae.MAE(args)
    assert not net.backbone.pos_embed.requires_grad  # fixed sine-cosine
    seen = []
    net.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    pred, mask = net.predict(torch.randn(2, 3, 32, 32))
    assert seen == [(2, 1 + 4, 192)]  # [CLS] + 25% of 16 patches
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.sum().item() == 2 * 12


@pytest.mark.slow
def test_mae_run_reconstruction_loss_falls_and_recon_png(tmp_path):
    from PIL import Image

    mae_flags = ["--arch", "vit_tiny", "--patch-size", 8, "--decoder-dim", 64, "--decoder-depth", 1, "--subset", 256,
                 "--epochs", 5, "--lr", 2e-3, "--knn-every", 0, "--log-every", 4]  # fmt: skip
    flags = [*merge_flags(TINY, mae_flags), "--out", tmp_path]
    run_script("mae.py", *flags)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    print("MAE losses:", [round(x, 3) for x in losses])
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2
    with Image.open(tmp_path / "recon.png") as im:
        assert im.size == (8 * 33 + 1, 3 * 33 + 1)  # 8 images per row, 3 rows, 1 px padding
    (tmp_path / "recon.png").unlink()
    run_script("mae.py", "--out", tmp_path, *flags[:-2], "--recon")  # on demand, from the checkpoint
    assert (tmp_path / "recon.png").exists()
