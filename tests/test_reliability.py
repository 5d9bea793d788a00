"""Clear errors and safe stops (issue 6): a forced NaN, bad input of every kind, odd image modes, AMP with its
GradScaler across a resume, a batch that does not split. Kill safety and exact resume are in test_scripts.py."""

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run_script
from PIL import Image

import common


def snapshot(folder):
    """{relative path: sha256} of every file under folder: what 'overwrites nothing' compares."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def assert_one_line_error(proc, *fragments):
    """A non-zero exit, no traceback, and a last line 'error: ...' holding every fragment."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and proc.stderr.count("error: ") == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last


def image_folder(root, n_per_class=24, size=32):
    """train/ and val/ with two classes of random images in every PIL mode a user's folder may hold."""
    modes = ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16"]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n_per_class if split == "train" else 4):
                rgb = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                mode = modes[i % len(modes)]
                img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
                ext = "jpg" if mode in ("CMYK", "L") else "png"
                img.save(root / split / c / f"{i:03d}.{ext}")
    return root


# ----------------------------------------------------------------------------------------------------------
# AMP and non-finite losses (kill safety and exact resume: test_scripts.py)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_and_its_grad_scaler_survives_resume(amp, tmp_path):
    """AMP on CPU with a tiny model (fp16 convolutions are very slow on CPU, so fp16 uses a ViT): killed after the
    first checkpoint and rerun, the run ends where an uninterrupted one does, GradScaler state included."""
    model = ["--arch", "resnet18"] if amp == "bf16" else ["--arch", "vit_tiny", "--patch-size", "8", "--img-size", "16"]
    flags = [*TINY, *model, "--amp", amp, "--batch", 16, "--subset", 64, "--epochs", 2, "--knn-every", 0]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("simclr.py", *flags, "--out", straight)
    from test_scripts import kill_after_first_checkpoint

    kill_after_first_checkpoint(["simclr.py", *flags, "--out", resumed])
    assert "resumed from" in run_script("simclr.py", *flags, "--out", resumed).stdout
    a, b = torch.load(straight / "backbone.pt"), torch.load(resumed / "backbone.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=False)["scaler"] for d in (straight, resumed))
    if amp == "fp16":  # the growth tracker counts steps since the scale last changed: 4 if the state were lost
        assert sa == sb and sa["scale"] > 0  # a fresh scaler on resume would count 4 steps, not 8, since its start
    else:
        assert sa == sb == {}  # bf16 needs no loss scaling: the scaler is disabled


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    proc = run_script("simclr.py", *TINY, "--epochs", 2, "--lr", 1e30, "--knn-every", 0, "--out", out, check=False)
    assert_one_line_error(proc, "loss became", "step", "--lr", "--amp")
    after = snapshot(out)
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and after["backbone.pt"] == before["backbone.pt"]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, a non-zero exit, nothing overwritten

BAD_FLAGS = {
    "missing data path": (["--dataset", "folder", "--data", "/no/such/folder"], "is not a folder"),
    "unknown arch": (["--arch", "resnet19"], "unknown --arch 'resnet19'; choose from"),
    "unknown dataset": (["--dataset", "imagenet21k"], "unknown --dataset 'imagenet21k'; choose from"),
    "unknown amp": (["--amp", "fp8"], "unknown --amp 'fp8'; choose from"),
    "unknown aug": (["--aug", "autoaugment"], "unknown augmentation recipe 'autoaugment'; choose from"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags(case, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    flags, message = BAD_FLAGS[case]
    assert_one_line_error(run_script("simclr.py", *TINY, *flags, "--out", out, check=False), message)
    assert snapshot(out) == before


@pytest.mark.slow
def test_empty_folder_and_folder_without_train(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    flags = [*TINY, "--dataset", "folder", "--data", tmp_path / "data", "--out", tmp_path / "run"]
    assert_one_line_error(run_script("simclr.py", *flags, check=False), "no images found under", "expected")
    flags[flags.index("--data") + 1] = tmp_path
    assert_one_line_error(run_script("simclr.py", *flags, check=False), "has no train/ folder", "expected")


@pytest.mark.slow
def test_out_not_writable(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run_script("simclr.py", *TINY, "--out", tmp_path / "a_file" / "run", check=False)
    assert_one_line_error(proc, "cannot create --out", "choose a writable folder")


@pytest.mark.slow
@pytest.mark.parametrize("other", [["byol.py"], ["simclr.py", "--arch", "resnet50"]])
def test_out_holding_another_run_is_refused_and_untouched(other, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    proc = run_script(other[0], *TINY, *other[1:], "--out", out, check=False)
    why = "method 'simclr' run, not 'byol'" if other[0] == "byol.py" else "arch 'resnet18' run, not 'resnet50'"
    assert_one_line_error(proc, why, "use another --out")
    assert snapshot(out) == before


@pytest.mark.slow
def test_batch_not_divisible_by_the_processes(tmp_path):
    proc = run_script("simclr.py", *TINY, "--batch", 33, "--out", tmp_path, torchrun=2, check=False)
    assert proc.returncode != 0
    assert "error: --batch 33 is not divisible by the 2 processes; pick a multiple of 2" in proc.stderr
    # torchrun adds its own failure summary (a traceback of the launcher); none comes from the project's files
    assert f'File "{ROOT}{os.sep}' not in proc.stderr and not (tmp_path / "args.json").exists()


def write_text_file(folder):
    (folder / "notes.pt").write_text("not a checkpoint")
    return folder / "notes.pt"


def write_a_list(folder):
    torch.save([1, 2], folder / "list.pt")
    return folder / "list.pt"


@pytest.mark.slow
@pytest.mark.parametrize(
    "make,message",
    [(lambda d: d / "missing.pt", "does not exist"), (write_text_file, "is not a checkpoint torch can read"),
     (write_a_list, "is not a state_dict")],
    ids=["missing file", "not a checkpoint", "not a state dict"],
)  # fmt: skip
def test_eval_linear_bad_checkpoint(make, message, tmp_path):
    proc = run_script("eval_linear.py", "--ckpt", make(tmp_path), "--workers", 0, check=False)
    assert_one_line_error(proc, message)


# ----------------------------------------------------------------------------------------------------------
# Image folders: every mode works; one corrupt file stops the run and names it


@pytest.mark.slow
def test_image_modes_become_rgb_and_a_folder_run_works(tmp_path):
    data = image_folder(tmp_path / "data")
    ds = common.ImageFiles(str(data / "train"))
    assert ds.classes == ["cat", "dog"] and len(ds) == 48
    for i in range(7):  # one of each mode
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 0
    flags = [*TINY, "--dataset", "folder", "--data", data, "--subset", 0, "--epochs", 1, "--knn-every", 1]
    run_script("simclr.py", *flags, "--out", tmp_path / "run")
    assert (tmp_path / "run" / "backbone.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named(workers, tmp_path):
    data = image_folder(tmp_path / "data")
    bad = data / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    flags = [*TINY, "--dataset", "folder", "--data", data, "--subset", 0, "--batch", 7, "--epochs", 1]
    proc = run_script("simclr.py", *flags, "--workers", workers, "--out", tmp_path / "run", check=False)
    # 49 images in batches of 7: every image is read in epoch 0
    assert_one_line_error(proc, f"cannot read image {bad}", "remove or replace it")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
