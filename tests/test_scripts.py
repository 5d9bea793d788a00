"""The method scripts and eval_linear.py end to end, as subprocesses, on the synthetic data."""

import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torchvision
from conftest import (
    DINO_LEARN,
    DINO_NET,
    EXACT,
    EXTRA,
    LEARN,
    METHODS,
    ROOT,
    kill_during_save,
    kill_group,
    merge_flags,
    run_in_group,
    run_script,
    script_env,
)

import common

REQUIRED = {"epoch", "step", "loss", "lr", "img_per_s", "flops", "time"}
# The learning runs take 5-10 minutes on 2 AVX2 cores in fp32: a hang, not a slow machine, should end them.
LEARN_TIMEOUT = 1800


def read_log(out):
    return common.read_log(os.path.join(out, "log.jsonl"))


def untimed(log):
    """A log's records without what depends on the machine's speed."""
    return [{k: v for k, v in record.items() if k not in ("img_per_s", "time")} for record in log]


def kill_after_first_checkpoint(argv, threads=EXACT):
    """Start a run, SIGKILL it as soon as its first checkpoint exists (the next epoch may be under way)."""
    out = argv[argv.index("--out") + 1]
    cmd = [sys.executable, *[str(a) for a in argv]]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with subprocess.Popen(cmd, cwd=ROOT, env=script_env(threads), start_new_session=True, **quiet) as child:
        while not os.path.exists(os.path.join(out, "checkpoint.pt")) and child.poll() is None:
            time.sleep(0.02)
        kill_group(child.pid)
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))


# Every script but DINO is killed after its first checkpoint (0 loader workers); SimCLR and DINO are also stopped
# within an epoch (test_a_run_stopped_within_an_epoch_resumes_bit_identical).
KILLS = [(m, "after-checkpoint") for m in METHODS if m != "dino"]
# The quick tier keeps one end-to-end run: SimCLR killed after its first checkpoint and resumed.
KILLS = [
    case if case == ("simclr", "after-checkpoint") else pytest.param(*case, marks=pytest.mark.slow) for case in KILLS
]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted 2-epoch runs (TINY, 0 workers, EXACT threads), one per command, shared by the tests that
    interrupt it."""
    done = {}

    def get(method, flags):
        key = (method, *map(str, flags))
        if key not in done:
            done[key] = tmp_path_factory.mktemp(f"straight-{method}")
            run_script(f"{method}.py", *flags, "--out", done[key], threads=EXACT)
        return done[key]

    return get


@pytest.mark.parametrize("method,kill", KILLS)
def test_run_writes_files_and_resumes_exactly(method, kill, tiny, straight_runs, tmp_path):
    # The k-NN monitor and a finished run's rerun are common code, checked on SimCLR only: each costs a process
    # or a pass over the 5,000 synthetic images, on every run.
    knn = method == "simclr"
    tiny = merge_flags(tiny, EXTRA[method], ["--epochs", 2], [] if knn else ["--knn-every", 0])
    straight, resumed = straight_runs(method, list(tiny)), tmp_path / "resumed"
    kill_after_first_checkpoint([f"{method}.py", *tiny, "--out", resumed])
    proc = run_script(f"{method}.py", *tiny, "--out", resumed, threads=EXACT)  # the same command again
    assert "resumed from" in proc.stdout and not any(".tmp" in name for name in os.listdir(resumed))
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "backbone.pt"):
        assert (straight / name).exists()
    args = json.loads((straight / "args.json").read_text())
    assert args["method"] == method and args["batch"] == 32 and args["epochs"] == 2
    log = read_log(straight)
    steps = [r for r in log if "loss" in r]
    assert all(REQUIRED <= set(r) for r in steps)
    assert [r["step"] for r in steps] == [2, 4, 6, 8]  # 128 images / batch 32 = 4 steps per epoch, logged every 2
    assert steps[-1]["flops"] == 4 * steps[0]["flops"] > 0 and all(r["img_per_s"] > 0 for r in steps)
    assert [r["epoch"] for r in log if "knn_top1" in r] == ([1] if knn else [])
    # the resumed run's log reads as the uninterrupted one's (losses and k-NN bit for bit; speeds differ)
    assert untimed(read_log(resumed)) == untimed(log)
    a, b = torch.load(straight / "backbone.pt"), torch.load(resumed / "backbone.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, resumed))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])  # teachers, heads, DINO's center
    assert ca["step"] == cb["step"] == 8
    if knn:  # a finished run rerun with the same command trains no more
        lines = len(read_log(resumed))
        run_script(f"{method}.py", *tiny, "--out", resumed)
        assert len(read_log(resumed)) == lines


# The online probe is on by default, so the straight runs train one.
PROBE_OFF = [m if m == "simclr" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


@pytest.mark.parametrize("method", PROBE_OFF)
def test_the_online_probe_never_changes_the_backbones_training(method, tiny, straight_runs, tmp_path):
    """With and without --online-probe, a run trains bit for bit the same: losses, weights, optimizer state (DINO
    probes the teacher through its hook, MAE computes its own features)."""
    knn = method == "simclr"
    flags = merge_flags(tiny, EXTRA[method], ["--epochs", 2], [] if knn else ["--knn-every", 0])
    straight = straight_runs(method, flags)
    run_script(f"{method}.py", *flags, "--online-probe", 0, "--out", tmp_path, threads=EXACT)
    on, off = untimed(read_log(straight)), untimed(read_log(tmp_path))
    assert all(0 <= r["online_train_top1"] <= 100 for r in on if "loss" in r)
    assert not any(key.startswith("online") for r in off for key in r)
    assert [{k: v for k, v in r.items() if not k.startswith("online")} for r in on] == off
    a, b = torch.load(straight / "backbone.pt"), torch.load(tmp_path / "backbone.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, tmp_path))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(x, y) for x, y in zip(optimizer_tensors(ca), optimizer_tensors(cb), strict=True))
    trained_head = ca["online_probe"]["head"]["weight"]  # from zeros, 10 classes by the feature width
    assert trained_head.shape[0] == 10 and trained_head.abs().sum() > 0
    assert cb["online_probe"] is None
    summary_on, summary_off = (json.loads((d / "summary.json").read_text()) for d in (straight, tmp_path))
    assert summary_off["online_top1"] is None
    if knn:
        assert summary_on["online_top1"] == on[-1]["online_top1"] and 0 <= summary_on["online_top1"] <= 100


# Runs a script as __main__ with common.Preemption.checkpoint_due sending SIGTERM to the script's whole process group
# (loader workers included, as a cluster signals every process of a job) at step N, just before it decides.
_SIGTERM_AT_STEP = """
import os, runpy, signal, sys
import common
due, at = common.Preemption.checkpoint_due, int(sys.argv.pop(1))
def signal_everyone(self, step):
    if step == at:
        os.killpg(0, signal.SIGTERM)
    return due(self, step)
common.Preemption.checkpoint_due = signal_everyone
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sigterm_at_step(argv, step):
    """Run a script in a process group of its own that is sent SIGTERM at `step`; returns the CompletedProcess."""
    return run_in_group([sys.executable, "-c", _SIGTERM_AT_STEP, str(step), *map(str, argv)], EXACT)


# SimCLR and DINO, 4 steps an epoch logged every 2, --ckpt-every 5, with 0 and 2 loader workers: SIGTERM at step 3
# (within epoch 0 and within a log interval) or 4 (epoch 0's last step: the resume runs an empty rest of epoch 0,
# then its end), then SIGKILL half-way through writing step 8's checkpoint, so that the last good one is step 5's,
# within epoch 1; each time rerun with the same command, the run ends bit-identical to an uninterrupted one (0
# workers, no --ckpt-every).
PREEMPTIONS = [("simclr", 2, 3), ("simclr", 0, 4), ("dino", 0, 3), ("dino", 2, 4)]
PREEMPTIONS = [
    case if case == ("simclr", 2, 3) else pytest.param(*case, marks=pytest.mark.slow)
    for case in PREEMPTIONS
    if case[0] in METHODS
]


@pytest.mark.parametrize("method,workers,stop_at", PREEMPTIONS)
def test_a_run_stopped_within_an_epoch_resumes_bit_identical(method, workers, stop_at, tiny, straight_runs, tmp_path):
    flags = merge_flags(tiny, EXTRA[method], ["--epochs", 2, "--knn-every", 0])
    straight, out = straight_runs(method, flags), tmp_path / "run"
    command = [f"{method}.py", *merge_flags(flags, ["--workers", workers, "--ckpt-every", 5]), "--out", out]
    proc = sigterm_at_step(command, stop_at)  # the run finishes the step, checkpoints within epoch 0, exits 75
    assert proc.returncode == common.EXIT_PREEMPTED == 75 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after step {stop_at}: {out / 'checkpoint.pt'} is written; the same command resumes"
    )
    stopped = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (stopped["step"], stopped["resume_epoch"]) == (stop_at, 0)
    # saves after the resume: epoch 0's end (checkpoint.pt, backbone.pt), step 5's (both), step 8's checkpoint.pt
    proc = kill_during_save(command, 5, EXACT)
    assert f"resumed from {out / 'checkpoint.pt'} in epoch 0 at step {stop_at}" in proc.stdout
    assert any(".pt.tmp" in name for name in os.listdir(out))  # the half-written file
    killed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (killed["step"], killed["resume_epoch"]) == (5, 1)  # the last good one, within epoch 1
    proc = run_script(*command, threads=EXACT)  # and again
    assert f"resumed from {out / 'checkpoint.pt'} in epoch 1 at step 5" in proc.stdout
    assert untimed(read_log(out)) == untimed(read_log(straight))
    a, b = torch.load(straight / "backbone.pt"), torch.load(out / "backbone.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, out))
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])  # teachers, heads, DINO's center
    assert all(torch.equal(x, y) for x, y in zip(optimizer_tensors(ca), optimizer_tensors(cb), strict=True))


def optimizer_tensors(checkpoint):
    return [t for s in checkpoint["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]


def test_simclr_backbone_loads_into_torchvision(trained):
    state = torch.load(trained / "backbone.pt")
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_processes(method, tiny, tmp_path):
    knn = [] if method == "simclr" else ["--knn-every", 0]  # the sharded k-NN monitor is common code
    run_script(f"{method}.py", *merge_flags(tiny, EXTRA[method], ["--epochs", 1], knn), "--out", tmp_path, torchrun=2)
    log = read_log(tmp_path)
    assert log[-1]["step"] == 4 and ("knn_top1" in log[-1]) == (not knn)
    assert (tmp_path / "backbone.pt").exists()


def test_eval_linear_on_a_run_and_at_random_init(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    proc = run_script("eval_linear.py", "--ckpt", run / "backbone.pt", "--epochs", 5, "--workers", 0, "--amp", "off")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["arch"] == "resnet18" and result["img_size"] == 32  # read from args.json beside the checkpoint
    assert 0 <= result["linear_top1"] <= 100 and 0 <= result["knn_top1"] <= 100
    assert json.loads((run / "eval.json").read_text()) == result
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
        "--amp",
        "off",
        "--out",
        out,
    )
    assert json.loads(out.read_text())["lr"] == 0.1


def test_bn_stats_from_data_are_the_mean_and_variance_of_the_images():
    """--bn-stats data: the first BatchNorm's running statistics become the per-channel mean and (unbiased)
    variance of conv1's output over the images, computed here directly; the backbone is left in eval mode."""
    import eval_linear

    args = SimpleNamespace(dataset="synthetic", data=None, arch="resnet18", width=1.0, stem="imagenet", img_size=32,
                           patch_size=None, seed=0, batch=64, workers=0, gpu_aug=False,
                           zero_init_residual=0)  # fmt: skip
    env = common.Env(torch.device("cpu"))
    backbone, train = common.build_backbone(args), common.build_dataset(args, "memory")
    eval_linear.estimate_bn_stats(backbone, train, args, env, images=48)  # one batch: exact statistics
    ids = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:48].tolist()
    with torch.no_grad():
        out = backbone.conv1(common.to_device([torch.stack([train[i][0] for i in ids])], args, env)[0])
    assert not backbone.training
    torch.testing.assert_close(backbone.bn1.running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(backbone.bn1.running_var, out.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert all(m.momentum == 0.1 for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow
def test_eval_linear_refuses_a_checkpoint_of_another_arch(trained):
    proc = run_script("eval_linear.py", "--ckpt", trained / "backbone.pt", "--arch", "resnet50", check=False)
    assert proc.returncode == 2 and "does not fit --arch resnet50" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_linear_takes_the_width_from_the_run(tmp_path):
    """A half-width run's backbone.pt loads with the width of its args.json; --width 1 refuses it."""
    import eval_linear

    args = SimpleNamespace(arch="resnet18", width=0.5, stem="imagenet", img_size=32, zero_init_residual=1)
    torch.save(common.build_backbone(args).state_dict(), tmp_path / "backbone.pt")
    (tmp_path / "args.json").write_text(json.dumps({**vars(args), "dataset": "synthetic", "method": "byol"}))
    loaded = eval_linear.resolve(eval_linear.get_args(["--ckpt", str(tmp_path / "backbone.pt")]))
    assert loaded.width == 0.5 and eval_linear.load_backbone(loaded).embed_dim == 256
    wrong = eval_linear.resolve(eval_linear.get_args(["--ckpt", str(tmp_path / "backbone.pt"), "--width", "1"]))
    with pytest.raises(common.UserError, match="--width"):
        eval_linear.load_backbone(wrong)


@pytest.mark.slow
def test_simclr_learns_on_synthetic_data(tmp_path):
    """4 epochs (248 steps) lift k-NN top-1 clearly above the same network at random init (measured: 49.6
    against 30.9, with the official defaults: zero-initialised residuals, the projector 512-512-128), and the online
    probe trained alongside above chance (10%) on the test split (measured: 24.5)."""
    train = [*LEARN, "--epochs", 4, "--temperature", 0.2, "--knn-every", 4, "--out", tmp_path]
    run_script("simclr.py", *train, timeout=LEARN_TIMEOUT)
    trained = read_log(tmp_path)[-1]["knn_top1"]
    online = json.loads((tmp_path / "summary.json").read_text())["online_top1"]
    print(f"simclr online linear top-1 {online:.1f}")
    assert online == read_log(tmp_path)[-1]["online_top1"] > 15  # chance: 10
    flags = [*LEARN[:8], "--workers", 0, "--amp", "off", "--out", tmp_path / "random.json"]
    random = json.loads(
        run_script("eval_linear.py", "--ckpt", "random", *flags, "--epochs", 1, "--lr", 0.1).stdout.splitlines()[-1]
    )
    print(f"simclr k-NN top-1: random init {random['knn_top1']:.1f}, trained {trained:.1f}")
    assert trained > random["knn_top1"] + 10


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_docstring_demo_runs(method, tmp_path):
    """Each script's docstring demo, as written but one epoch on 128 images in fp32 with the k-NN monitor at its end:
    the demo line cannot rot."""
    from test_design import docstring_demo

    short = ["--epochs", 1, "--subset", 128, "--workers", 0, "--knn-every", 1, "--amp", "off"]
    run_script(f"{method}.py", *merge_flags(docstring_demo(method), short), "--out", tmp_path)
    assert "knn_top1" in read_log(tmp_path)[-1]


def knn_with_data_bn_stats(ckpt, *flags):
    proc = run_script("eval_linear.py", "--ckpt", ckpt, *flags, "--bn-stats", "data", "--epochs", 1, "--lr", 0.1,
                      "--amp", "off")  # fmt: skip
    return json.loads(proc.stdout.splitlines()[-1])["knn_top1"]


@pytest.mark.slow
def test_dino_learns_on_synthetic_data(tmp_path):
    """3 epochs (186 steps) lift k-NN top-1 above the same network at random init, both scored with BatchNorm
    statistics of the training images (eval_linear --bn-stats data), the state any trained network is in. Not
    against the checkpoint's statistics: at random init they are the identity, and that un-normalised network
    scores 34.5 here against 15.6 normalised (28.8 against 22.2 on cifar10-subset), out of DINO's reach in 6 epochs.
    Measured: 23.5 against 15.6 (6 epochs: 25.1; seed 1: 34.3 against 19.1). Controls: a teacher that never moves
    (--ema 1) stays at 15.6 (3 and 6 epochs); without centring (--center-momentum 1) all images fall on one
    prototype (loss 0.00; 6 epochs: 20.6), which the loss check catches."""
    run_script("dino.py", *DINO_LEARN, "--epochs", 3, "--knn-every", 0, "--out", tmp_path, timeout=LEARN_TIMEOUT)
    trained = knn_with_data_bn_stats(tmp_path / "backbone.pt", "--workers", 2)
    random = knn_with_data_bn_stats("random", *DINO_NET, "--workers", 2, "--out", tmp_path / "random.json")
    losses = [r["loss"] for r in read_log(tmp_path) if "loss" in r]
    print(f"dino k-NN top-1 (BN statistics from the data): random init {random:.1f}, trained {trained:.1f}")
    print("dino losses:", [round(x, 2) for x in losses])
    assert trained > random + 5
    assert losses[-1] > 1.0  # not collapsed onto one prototype


# (loss factor after 3 epochs)
SLOW_STARTERS = {"byol": (["--ema", "0.99", "--mlp", "1024-256"], 0.7), "vicreg": (["--mlp", "1024-1024-1024"], 0.97)}


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m in SLOW_STARTERS])
def test_learns_loss_falls_on_synthetic_data(method, tmp_path):
    """BYOL and VICReg need more steps than a CI test can give before k-NN rises above a random network's
    (after 3 epochs on 4000 images: BYOL 28.1, VICReg 27.9 against 30.9 at random init); here the loss must fall.
    Measured (last 3 intervals against the first): BYOL 0.43, VICReg 0.946 (0.937 with --zero-init-residual 0)."""
    flags, factor = SLOW_STARTERS[method]  # VICReg's 0.97: room for another CPU's arithmetic above the measured 0.946
    run_script(f"{method}.py", *LEARN, *flags, "--subset", 1024, "--epochs", 3, "--knn-every", 0,
               "--log-every", 4, "--out", tmp_path)  # fmt: skip
    losses = [r["loss"] for r in read_log(tmp_path) if "loss" in r]
    print(f"{method} losses:", [round(x, 3) for x in losses])
    assert sum(losses[-3:]) / 3 < factor * losses[0]
