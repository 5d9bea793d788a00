"""bench/gpu_check.py, the prepared check of the CUDA path: its CPU dry run passes every check with the numbers the
report promises, and a check that cannot pass is reported as failed."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import METHODS, ROOT

CHECK = os.path.join(ROOT, "bench", "gpu_check.py")
TRAINING = [f"{m}-{amp}" for amp in ("bf16", "fp16") for m in METHODS]


def gpu_check(*argv, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, CHECK, *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path):
    """The 14 checks in their order, each passed, each with the numbers and the path docs/gpu.md promises."""
    proc = gpu_check("--dry-run", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    checks = {entry["check"]: entry for entry in report["checks"]}
    paths = ["gpu-aug", "torchrun", "resume", "eval"]
    assert list(checks) == ["simclr-bf16", "dino-bf16", "mae-bf16", *paths, *TRAINING[5:], "byol-bf16", "vicreg-bf16"]
    assert report["dry_run"] and report["device"] == "cpu" and all(e["ok"] for e in checks.values())
    assert os.listdir(tmp_path) == ["gpu_check.json"]  # the runs went to a temporary folder, removed at the end
    for name in TRAINING:
        entry = checks[name]
        assert entry["img_per_s"] > 0 and entry["losses"][-1] == round(entry["final_loss"], 4), entry
        assert math.isfinite(entry["final_loss"]) and entry["flops_per_step"] > 0
        flop_per_s = entry["flops_per_step"] * entry["img_per_s"] / report["batch"]
        assert entry["fraction_of_matmul"] == pytest.approx(flop_per_s / entry["matmul_flop_per_s"], rel=0.01)
        assert entry["path"]["autocast"] == "off" and not entry["path"]["compiled"]  # the dry run's fp32, no compile
        resnet = not name.startswith(("dino", "mae"))
        assert entry["path"].get("channels_last") is (True if resnet else None)
        assert entry["path"]["optimizer"] == ("LARS" if resnet else "AdamW") and entry["path"]["workers"] == 1
    assert not checks["simclr-bf16"]["path"]["ddp"]
    assert checks["torchrun"]["path"]["ddp"] and checks["torchrun"]["path"]["backend"] == "gloo"
    gpu_aug = checks["gpu-aug"]
    assert gpu_aug["relative_gap"] < 0.03 and gpu_aug["path"]["workers"] == 1, gpu_aug
    resume = checks["resume"]
    assert resume["killed_after_step"] > resume["checkpoint_step"] > 0
    assert resume["resumed_loss"] == resume["killed_loss"]  # on the CPU the lost interval retrains bit for bit
    per_epoch = resume["checkpoint_step"]  # 3 epochs, logged every 2 steps and at each epoch's end
    expected = [s for s in range(1, 3 * per_epoch + 1) if s % 2 == 0 or s % per_epoch == 0]
    assert resume["logged_steps"] == expected, resume  # each once: the killed run's later records were dropped
    assert checks["eval"]["ckpt"] == os.path.join("resume", "backbone.pt") and 0 <= checks["eval"]["linear_top1"] <= 100


def test_a_check_that_cannot_pass_fails_the_run(tmp_path):
    """eval alone has no backbone to probe: the report says so and the exit code is 1."""
    proc = gpu_check("--dry-run", "--checks", "eval", "--out", tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    with open(tmp_path / "gpu_check.json") as f:
        (entry,) = json.load(f)["checks"]
    assert entry["check"] == "eval" and not entry["ok"] and "no backbone.pt" in entry["error"]
    assert "FAILED" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dry-run", "--checks", "simclr-bf16,warp"], "unknown --checks warp; choose from"),
        (["--dry-run", "--steps", "1"], "--steps 1: give 6 to 31"),
        ([], "no CUDA device here"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path):
    if not argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = gpu_check(*argv, "--out", tmp_path / "out", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
