"""eval_linear.py's protocols as the official code runs them: crops redrawn per epoch, DINO's multi-block features,
MAE's LARS probe with warmup, and the settings eval.json records."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import common
import eval_linear


def fake_run(folder, method, **kwargs):
    """A run folder as a training script leaves it: backbone.pt (random weights) and args.json."""
    args = {
        "dataset": "synthetic",
        "img_size": 32,
        "patch_size": 8,
        "stem": "auto",
        "width": 1.0,
        "zero_init_residual": 1,
    }
    args.update(kwargs)
    torch.manual_seed(0)
    torch.save(common.build_backbone(SimpleNamespace(**args)).state_dict(), folder / "backbone.pt")
    (folder / "args.json").write_text(json.dumps({**args, "method": method}))
    return folder / "backbone.pt"


def resolved(ckpt, *flags):
    return eval_linear.resolve(eval_linear.get_args(["--ckpt", str(ckpt), *map(str, flags)]))


class Indexed(torch.utils.data.Dataset):
    """Synthetic images labelled by their own index, so that a batch says which image each crop came from."""

    def __init__(self, n):
        self.images = common.SyntheticTextures(n, 32, seed=3)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0], i


def crops_by_image(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return {int(i): crop for views, labels in loader for crop, i in zip(views[0], labels)}


def test_augmented_probe_redraws_crops_every_epoch():
    """Each epoch draws new crops and flips of every image; the same (seed, epoch) draws the same ones."""
    args = SimpleNamespace(img_size=16, seed=0, batch=8, workers=0)
    loader = eval_linear.augmented_loader(Indexed(32), args)
    first, second = crops_by_image(loader, 0), crops_by_image(loader, 1)
    assert first.keys() == second.keys() == set(range(32))
    assert sum(not torch.equal(first[i], second[i]) for i in first) >= 30
    again = crops_by_image(eval_linear.augmented_loader(Indexed(32), args), 0)
    assert all(torch.equal(first[i], again[i]) for i in first)


def manual_block_outputs(vit, x):
    """The ViT's blocks run by hand: each block's output through the final norm."""
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    h = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1), tokens], dim=1)
    outputs = []
    for block in vit.blocks:
        h = block(h)
        outputs.append(vit.norm(h))
    return outputs


def test_dino_vit_probe_defaults_follow_the_official_eval():
    for arch, blocks, avgpool in [("vit_tiny", 4, "off"), ("vit_small", 4, "off"), ("vit_base", 1, "on")]:
        for method in ("dino", "mae"):
            args = SimpleNamespace(
                **{**vars(eval_linear.get_args(["--ckpt", "random"])), "arch": arch, "method": method}
            )
            settings = eval_linear.protocol_defaults(args)
            expected = (blocks, avgpool) if method == "dino" else (1, "off")
            assert (settings["n_last_blocks"], settings["avgpool"]) == expected


def test_dino_probe_features_are_the_last_blocks_cls_tokens_and_mean_patch_token(tmp_path):
    ckpt = fake_run(tmp_path, "dino", arch="vit_tiny")
    args = resolved(ckpt)
    vit = eval_linear.load_backbone(args).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        blocks = manual_block_outputs(vit, x)
        four = eval_linear.ProbedFeatures(vit, args.n_last_blocks, args.avgpool == "on")
        assert four.embed_dim == 4 * 192 and four(x).shape == (3, 4 * 192)
        torch.testing.assert_close(four(x), torch.cat([b[:, 0] for b in blocks[-4:]], dim=1))
        torch.testing.assert_close(four(x)[:, four.final], vit(x))  # k-NN reads the final [CLS] token
        pooled = eval_linear.ProbedFeatures(vit, 1, avgpool=True)
        torch.testing.assert_close(pooled(x), torch.cat([blocks[-1][:, 0], blocks[-1][:, 1:].mean(1)], dim=1))
        torch.testing.assert_close(pooled(x)[:, pooled.final], vit(x))


def test_eval_json_says_what_was_probed_and_how(tmp_path):
    ckpt = fake_run(tmp_path, "dino", arch="vit_tiny")
    flags = ["--subset", "64", "--epochs", "1", "--lr", "0.1", "--workers", "0", "--amp", "off"]
    eval_linear.main(["--ckpt", str(ckpt), *flags])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["features"] == "the [CLS] tokens of the last 4 blocks" and result["feature_dim"] == 4 * 192
    assert {k: result[k] for k in ("protocol", "optimizer", "epochs", "batch", "warmup_epochs", "bn_head")} == {
        "protocol": "features", "optimizer": "sgd", "epochs": 1, "batch": 64, "warmup_epochs": 0, "bn_head": "off"
    }  # fmt: skip


def test_mae_augmented_probe_defaults_are_the_official_linprobe(tmp_path):
    ckpt = fake_run(tmp_path, "mae", arch="vit_tiny")
    official = resolved(ckpt, "--protocol", "augmented")
    got = {k: getattr(official, k) for k in ("optimizer", "epochs", "batch", "warmup_epochs", "bn_head", "wd")}
    assert got == {"optimizer": "lars", "epochs": 90, "batch": 16384, "warmup_epochs": 10, "bn_head": "on", "wd": 0}
    fast = resolved(ckpt)  # the features protocol stays the fast default
    assert (fast.optimizer, fast.epochs, fast.batch, fast.warmup_epochs) == ("sgd", 100, 256, 0)
    with pytest.raises(common.UserError, match="ResNet"):
        resolved(fake_run(tmp_path, "simclr", arch="resnet18"), "--n-last-blocks", 4)


def test_mae_augmented_probe_runs_lars_with_warmup_then_cosine(tmp_path, monkeypatch):
    """4 epochs of one full-set batch (16384 capped at 48 images), 2 of warmup: the lr per step is 0, peak/2, then
    the cosine's peak and midpoint, with peak = 0.1 x 48/256; the head is trained by LARS."""
    ckpt = fake_run(tmp_path, "mae", arch="vit_tiny")
    lrs, optimizers = [], []
    real_set_lr = common.set_lr

    def record(optimizer, lr):
        lrs.append(lr)
        optimizers.append(optimizer)
        real_set_lr(optimizer, lr)

    monkeypatch.setattr(common, "set_lr", record)
    flags = ["--protocol", "augmented", "--subset", 48, "--epochs", 4, "--warmup-epochs", 2, "--workers", 0]
    eval_linear.main(["--ckpt", str(ckpt), *map(str, flags), "--amp", "off"])
    peak = 0.1 * 48 / 256
    assert lrs == pytest.approx([0.0, peak / 2, peak, peak * 0.5 * (1 + math.cos(math.pi / 2))])
    assert isinstance(optimizers[0], common.LARS)
    assert optimizers[0].defaults["weight_decay"] == 0 and optimizers[0].defaults["momentum"] == 0.9
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["optimizer"], result["batch"], result["bn_head"]) == ("lars", 48, "on")


def test_augmented_probe_trains_on_every_image_once_per_epoch_with_that_epochs_draws(tmp_path, monkeypatch):
    """The probe's own loop sets the epoch: the keys reaching the augmentation are (epoch, index), every training
    image once in each epoch (the bug this replaces drew every image's crop with epoch 0, every epoch)."""
    keys = []
    real_getitem = common.Augmented.__getitem__

    def record(self, key):
        keys.append(key)
        return real_getitem(self, key)

    monkeypatch.setattr(common.Augmented, "__getitem__", record)
    flags = ["--ckpt", "random", "--arch", "resnet18", "--protocol", "augmented", "--subset", 16, "--epochs", 3]
    eval_linear.main([*map(str, flags), "--batch", "8", "--lr", "0.1", "--workers", "0", "--amp", "off",
                      "--out", str(tmp_path / "e")])  # fmt: skip
    drawn = [k for k in keys if isinstance(k, tuple)]  # the center crops of the features are keyed by index only
    assert sorted(drawn) == [(epoch, i) for epoch in range(3) for i in range(16)]


def test_probe_settings_refuse_zero(capsys):
    """An explicit 0 is refused as the flag is parsed (it once fell back to the default), a ViT's block count also
    against the arch's depth."""
    for flag in ("--epochs", "--batch", "--n-last-blocks"):
        with pytest.raises(SystemExit):
            resolved("random", "--arch", "vit_tiny", flag, 0)
        assert f"argument {flag}: invalid value '0'" in capsys.readouterr().err
    with pytest.raises(common.UserError, match="--n-last-blocks 13 must be between 1 and 12"):
        resolved("random", "--arch", "vit_tiny", "--n-last-blocks", 13)
