"""The method scripts and eval_linear.py end to end, as subprocesses, on the synthetic data."""

import json
import os

import pytest
import torch
import torchvision
from conftest import run_script

METHODS = [
    m
    for m in ("simclr", "byol", "vicreg", "dino", "mae")
    if os.path.exists(os.path.join(os.path.dirname(__file__), "..", f"{m}.py"))
]
REQUIRED = {"epoch", "step", "loss", "lr", "img_per_s", "flops"}
# Small heads keep the CPU runs short.
EXTRA = {"simclr": [], "byol": ["--mlp", "64-32", "--ema", "0.99"], "vicreg": ["--mlp", "128-128-128"]}
# Short runs on synthetic data that must lift k-NN accuracy clearly above the same network at random init.
LEARN = {
    "simclr": ["--aug", "simclr-cifar", "--optimizer", "adamw", "--lr", 2e-3, "--wd", 1e-4, "--temperature", 0.2],
    "byol": [
        "--aug",
        "simclr-cifar",
        "--optimizer",
        "adamw",
        "--lr",
        2e-3,
        "--wd",
        1e-4,
        "--ema",
        0.99,
        "--mlp",
        "1024-128",
    ],
    "vicreg": ["--aug", "simclr-cifar", "--optimizer", "adamw", "--lr", 2e-3, "--wd", 1e-4, "--mlp", "1024-1024-1024"],
}


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", METHODS)
def test_run_writes_files_and_resumes_exactly(method, tiny, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tiny += EXTRA[method]
    run_script(f"{method}.py", *tiny, "--epochs", 2, "--out", straight)
    run_script(f"{method}.py", *tiny, "--epochs", 1, "--out", resumed)
    first = read_log(resumed)
    proc = run_script(f"{method}.py", *tiny, "--epochs", 2, "--out", resumed)
    assert "resumed" in proc.stdout
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "backbone.pt"):
        assert (straight / name).exists()
    args = json.loads((straight / "args.json").read_text())
    assert args["method"] == method and args["batch"] == 32 and args["epochs"] == 2
    log = read_log(straight)
    steps = [r for r in log if "loss" in r]
    assert all(REQUIRED <= set(r) for r in steps)
    assert [r["step"] for r in steps] == [2, 4]  # 128 images / batch 32 = 4 steps per epoch
    assert steps[-1]["flops"] == 2 * steps[0]["flops"] > 0 and all(r["img_per_s"] > 0 for r in steps)
    assert sum("knn_top1" in r for r in log) == 2
    # the rerun continued from epoch 1 at step 4, and ended where the uninterrupted run did, bit for bit
    second = read_log(resumed)[len(first) :]
    assert second[0]["epoch"] == 1 and second[0]["step"] == 6
    a, b = torch.load(straight / "backbone.pt"), torch.load(resumed / "backbone.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run rerun with the same command does nothing and keeps its files
    proc = run_script(f"{method}.py", *tiny, "--epochs", 2, "--out", resumed)
    assert len(read_log(resumed)) == len(first) + len(second)


def test_simclr_backbone_loads_into_torchvision(tiny, tmp_path):
    run_script("simclr.py", *tiny, "--epochs", 1, "--knn-every", 0, "--out", tmp_path)
    state = torch.load(tmp_path / "backbone.pt")
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_torchrun_two_processes(tiny, tmp_path):
    run_script("simclr.py", *tiny, "--epochs", 1, "--out", tmp_path, torchrun=2)
    log = read_log(tmp_path)
    assert log[-1]["step"] == 4 and "knn_top1" in log[-1]
    assert (tmp_path / "backbone.pt").exists()


def test_eval_linear_on_a_run_and_at_random_init(tiny, tmp_path):
    run_script("simclr.py", *tiny, "--epochs", 1, "--knn-every", 0, "--out", tmp_path)
    proc = run_script("eval_linear.py", "--ckpt", tmp_path / "backbone.pt", "--epochs", 5, "--workers", 0)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["arch"] == "resnet18" and result["img_size"] == 32  # read from args.json beside the checkpoint
    assert 0 <= result["linear_top1"] <= 100 and 0 <= result["knn_top1"] <= 100
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    out = tmp_path / "random.json"
    proc = run_script(
        "eval_linear.py",
        "--ckpt",
        "random",
        "--arch",
        "resnet18",
        "--stem",
        "imagenet",
        "--epochs",
        5,
        "--lr",
        0.1,
        "--workers",
        0,
        "--out",
        out,
    )
    assert json.loads(out.read_text())["lr"] == 0.1


def test_eval_linear_refuses_a_checkpoint_of_another_arch(tiny, tmp_path):
    run_script("simclr.py", *tiny, "--epochs", 1, "--knn-every", 0, "--out", tmp_path)
    proc = run_script("eval_linear.py", "--ckpt", tmp_path / "backbone.pt", "--arch", "resnet50", check=False)
    assert proc.returncode == 2 and "does not fit --arch resnet50" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method", METHODS)
def test_learns_on_synthetic_data(method, tmp_path):
    """A short run lifts k-NN accuracy clearly above the same network at random init."""
    common_flags = ["--dataset", "synthetic", "--arch", "resnet18", "--stem", "imagenet", "--img-size", 32]
    run_script(
        f"{method}.py",
        *common_flags,
        "--batch",
        64,
        "--subset",
        1024,
        "--epochs",
        4,
        "--workers",
        0,
        "--warmup-epochs",
        1,
        "--knn-every",
        0,
        *LEARN[method],
        "--out",
        tmp_path,
    )
    trained = json.loads(
        run_script(
            "eval_linear.py", "--ckpt", tmp_path / "backbone.pt", "--epochs", 1, "--lr", 0.1, "--workers", 0
        ).stdout.splitlines()[-1]
    )
    random = json.loads(
        run_script(
            "eval_linear.py",
            "--ckpt",
            "random",
            *common_flags,
            "--epochs",
            1,
            "--lr",
            0.1,
            "--workers",
            0,
            "--out",
            tmp_path / "r.json",
        ).stdout.splitlines()[-1]
    )
    print(f"{method} k-NN top-1: random init {random['knn_top1']:.1f}, trained {trained['knn_top1']:.1f}")
    assert trained["knn_top1"] > random["knn_top1"] + 10
