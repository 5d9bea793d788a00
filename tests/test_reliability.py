"""Clear errors and safe stops (issue 6): a forced NaN, bad input of every kind, odd image modes, AMP with its
GradScaler across a resume, a batch that does not split. Kill safety and exact resume are in test_scripts.py."""

import hashlib
import importlib
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EXACT, METHODS, ROOT, TINY, merge_flags, run_script
from PIL import Image

import common
import simclr


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
    run_script("simclr.py", *flags, "--out", straight, threads=EXACT)
    from test_scripts import kill_after_first_checkpoint

    kill_after_first_checkpoint(["simclr.py", *flags, "--out", resumed])
    assert "resumed from" in run_script("simclr.py", *flags, "--out", resumed, threads=EXACT).stdout
    a, b = torch.load(straight / "backbone.pt"), torch.load(resumed / "backbone.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=False)["scaler"] for d in (straight, resumed))
    if amp == "fp16":  # the growth tracker counts steps since the scale last changed: 4 if the state were lost
        assert sa == sb and sa["scale"] > 0  # a fresh scaler on resume would count 4 steps, not 8, since its start
    else:
        assert sa == sb == {}  # bf16 needs no loss scaling: the scaler is disabled


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The loss turns NaN at step 5, the first of epoch 1, where --ckpt-every 5 checkpoints before the interval
    is logged: the checkpoint's own check stops the run, and epoch 0's checkpoint stays, byte for byte."""
    calls, loss = [0], simclr.nt_xent

    def nan_from_step_5(*args):
        calls[0] += 1  # the FLOP count's forward, then one per step
        return loss(*args) * (float("nan") if calls[0] > 5 else 1.0)

    monkeypatch.setattr(simclr, "nt_xent", nan_from_step_5)
    out = tmp_path / "run"
    saved, save = [], common.atomic_save
    monkeypatch.setattr(
        common, "atomic_save", lambda obj, path: (saved.append(os.path.basename(path)), save(obj, path))
    )
    argv = merge_flags(TINY, ["--epochs", 2, "--knn-every", 0, "--ckpt-every", 5], ["--out", out])
    code, stderr = run_main("simclr.py", argv, capsys)
    last = stderr.strip().split("\r")[-1]
    assert code == 2 and last.startswith("error: loss became nan by step 5: lower --lr, or try --amp off")
    steps = [r["step"] for r in common.read_log(out / "log.jsonl") if "loss" in r]
    assert steps == [2, 4] and saved == ["checkpoint.pt", "backbone.pt"]  # epoch 0's, nothing after
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, a non-zero exit, nothing overwritten


def run_main(script, argv, capsys):
    """A script's main() in this process as its command line runs it (through common.run); returns (exit code,
    stderr). A traceback would fail the test as an exception."""
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as stopped:
        common.run(lambda: module.main([str(word) for word in argv]))
    return stopped.value.code, capsys.readouterr().err


def fake_run(folder):
    """A folder holding what a run writes, to see that a refused command leaves every byte of it."""
    folder.mkdir()
    for name in ("args.json", "log.jsonl", "summary.json"):
        (folder / name).write_text(f"{name} of an earlier run\n")
    return folder


# (script, flags, what the one error line says): argparse's own line names the flag and the value; the
# project's names the combination. Every case exits 2 and writes nothing.
BAD_VALUES = [
    ("simclr.py", ["--batch", 0], "argument --batch: invalid value '0': must be an integer >= 1"),
    ("simclr.py", ["--workers", -1], "argument --workers: invalid value '-1': must be an integer >= 0"),
    ("simclr.py", ["--epochs", -3], "argument --epochs: invalid value '-3'"),
    ("simclr.py", ["--lr", -1], "argument --lr: invalid value '-1': must be a number > 0"),
    ("simclr.py", ["--lr", "nan"], "argument --lr: invalid value 'nan'"),
    ("simclr.py", ["--wd", "inf"], "argument --wd: invalid value 'inf': must be a number >= 0"),
    ("simclr.py", ["--temperature", 0], "argument --temperature: invalid value '0'"),
    ("simclr.py", ["--mlp", "abc"], "argument --mlp: invalid value 'abc': must be embed-128 or 2048-128"),
    ("simclr.py", ["--mlp", "2048-0"], "argument --mlp: invalid value '2048-0'"),
    ("simclr.py", ["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
    ("simclr.py", ["--aug", "autoaugment"], "argument --aug: invalid choice: 'autoaugment'"),
    ("simclr.py", ["--arch", "resnet19"], "argument --arch: invalid choice: 'resnet19'"),
    ("simclr.py", ["--dataset", "imagenet21k"], "argument --dataset: invalid choice: 'imagenet21k'"),
    ("simclr.py", ["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("simclr.py", ["--stem", "tiny"], "argument --stem: invalid choice: 'tiny'"),
    ("simclr.py", ["--seed", -1], "argument --seed: invalid value '-1'"),
    ("simclr.py", ["--subset", -5], "argument --subset: invalid value '-5'"),
    ("simclr.py", ["--img-size", 0], "argument --img-size: invalid value '0'"),
    ("simclr.py", ["--width", 0], "argument --width: invalid value '0'"),
    ("simclr.py", ["--budget-flops", -1], "argument --budget-flops: invalid value '-1'"),
    ("simclr.py", ["--lars-clip", 2], "argument --lars-clip: invalid choice: 2"),
    ("simclr.py", ["--ckpt-every", -1], "argument --ckpt-every: invalid value '-1'"),
    ("simclr.py", ["--log-every", 0], "argument --log-every: invalid value '0'"),
    ("simclr.py", ["--negatives", 100], "--negatives 100 exceeds the 62 other views of a --batch 32"),
    ("simclr.py", ["--warmup-epochs", -1], "argument --warmup-epochs: invalid value '-1': must be a number >= 0"),
    ("simclr.py", ["--arch", "vit_tiny", "--patch-size", 5], "--img-size 32 is not a multiple of --patch-size 5"),
    ("simclr.py", ["--arch", "vit_tiny", "--width", 2], "--width 2.0 must be 1 for a ViT"),
    ("byol.py", ["--ema", 1.5], "argument --ema: invalid value '1.5': must be a number in [0, 1]"),
    ("byol.py", ["--mlp", "embed-256"], "argument --mlp: invalid value 'embed-256': must be 2048-128"),
    ("vicreg.py", ["--std-coeff", -1], "argument --std-coeff: invalid value '-1'"),
    ("vicreg.py", ["--variant", "barlow"], "argument --variant: invalid choice: 'barlow'"),
    ("dino.py", ["--teacher-temp", 0], "argument --teacher-temp: invalid value '0'"),
    ("dino.py", ["--center-momentum", 2], "argument --center-momentum: invalid value '2'"),
    ("dino.py", ["--local-crops", -1], "argument --local-crops: invalid value '-1'"),
    ("dino.py", ["--norm-last-layer", 2], "argument --norm-last-layer: invalid choice: 2"),
    ("dino.py", ["--drop-path", 1], "argument --drop-path: invalid value '1': must be a number in [0, 1)"),
    ("dino.py", ["--freeze-last-layer", -1], "argument --freeze-last-layer: invalid value '-1'"),
    ("mae.py", ["--mask-ratio", 1], "argument --mask-ratio: invalid value '1': must be a number in [0, 1)"),
    ("mae.py", ["--mask-ratio", 0.99], "--mask-ratio 0.99 keeps no patch of 32 px in 8 px"),
    ("mae.py", ["--decoder-dim", 20], "--decoder-dim 20 must be a multiple of the decoder's 16 attention heads"),
    ("mae.py", ["--arch", "resnet18"], "argument --arch: invalid choice: 'resnet18'"),
    ("mae.py", ["--norm-pix", 3], "argument --norm-pix: invalid choice: 3"),
    ("eval_linear.py", ["--epochs", 0], "argument --epochs: invalid value '0'"),
    ("eval_linear.py", ["--batch", -1], "argument --batch: invalid value '-1'"),
    ("eval_linear.py", ["--lr", 0], "argument --lr: invalid value '0'"),
    ("eval_linear.py", ["--protocol", "finetune"], "argument --protocol: invalid choice: 'finetune'"),
    ("eval_linear.py", ["--workers", -2], "argument --workers: invalid value '-2'"),
    ("eval_linear.py", ["--arch", "resnet19"], "argument --arch: invalid choice: 'resnet19'"),
    ("eval_linear.py", ["--warmup-epochs", -1], "argument --warmup-epochs: invalid value '-1'"),
]


@pytest.mark.parametrize("script,flags,message", BAD_VALUES, ids=[f"{s} {f[0]} {f[1]}" for s, f, _ in BAD_VALUES])
def test_bad_values_exit_2_with_one_error_line_and_write_nothing(script, flags, message, tmp_path, capsys):
    out = fake_run(tmp_path / "run")
    before = snapshot(out)
    if script == "eval_linear.py":
        argv = ["--ckpt", "random", *flags, "--workers", 0, "--out", out / "eval.json"]
    else:
        argv = merge_flags(TINY, ["--arch", "vit_tiny", "--patch-size", 8] if script == "mae.py" else [], flags)
        argv += ["--out", out]
    code, stderr = run_main(script, argv, capsys)
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], stderr
    assert snapshot(out) == before


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_the_process_group(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: the check needs no process group
    code, stderr = run_main("simclr.py", [*TINY, "--batch", 33, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "error: --batch 33 is not divisible by the 2 processes; pick a multiple of 2" in stderr
    assert not (tmp_path / "run").exists()


class Parser(Exception):
    pass


def parser_of(script, monkeypatch):
    """The script's argument parser after common.with_checks, caught as it is about to parse."""
    real = common.with_checks

    def catch(parser):
        raise Parser(real(parser))

    monkeypatch.setattr(common, "with_checks", catch)
    with pytest.raises(Parser) as caught:
        importlib.import_module(script.removesuffix(".py")).get_args(["--ckpt", "random"] if "eval" in script else [])
    return caught.value.args[0]


@pytest.mark.parametrize("script", [f"{m}.py" for m in METHODS] + ["eval_linear.py"])
def test_every_flag_has_a_checked_type_or_choices_and_its_default_passes(script, monkeypatch):
    """A new numeric flag without a range in common.FLAG_RANGES, or an enumerated one without choices, fails here."""
    free_text = {"help", "data", "out", "ckpt"}  # paths
    for action in parser_of(script, monkeypatch)._actions:
        if action.dest in free_text or action.nargs == 0:  # paths, --help and on/off switches
            continue
        assert isinstance(action.type, common.Checked) or action.choices, f"{script} --{action.dest} is unchecked"
        if action.default is not None:
            assert action.choices is None or action.default in action.choices, action.dest
            assert not isinstance(action.type, common.Checked) or action.type.test(action.default), action.dest


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,message",
    [(["--mlp", "abc"], "argument --mlp: invalid value 'abc'"),
     (["--dataset", "folder", "--data", "/no/such/folder"], "--data '/no/such/folder' is not a folder")],
    ids=["bad value", "missing data path"],
)  # fmt: skip
def test_bad_input_in_a_real_process(flags, message, trained, tmp_path):
    """As a user meets it: a process of its own, its exit code, its stderr, the run folder it was pointed at."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    proc = run_script("simclr.py", *TINY, *flags, "--out", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr.splitlines()[-1]
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------
# A resume continues the same run: what is trained may not change, how it is fed and watched may


CHANGES = {
    "batch": (["--batch", 16], "--batch 32 (now 16)"),
    "lr": (["--lr", 5], "--lr 0.001 (now 5.0)"),
    "epochs": (["--epochs", 2], "--epochs 1 (now 2)"),
    "seed": (["--seed", 3], "--seed 0 (now 3)"),
    "aug": (["--aug", "byol"], "--aug simclr (now byol)"),
    "method flag": (["--temperature", 0.5], "--temperature 0.1 (now 0.5)"),
    "data": (["--subset", 64], "--subset 128 (now 64)"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_resume_refuses_a_changed_run_naming_each_flag(change, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    flags, named = CHANGES[change]
    code, stderr = run_main(
        "simclr.py", merge_flags(TINY, ["--epochs", 1, "--knn-every", 0], flags, ["--out", out]), capsys
    )
    assert code == 2 and stderr.count("error: ") == 1 and "Traceback" not in stderr
    assert named in stderr and "use a new --out" in stderr
    assert snapshot(out) == before


def test_a_resume_names_every_changed_flag_in_one_line(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    flags = merge_flags(TINY, ["--epochs", 2, "--knn-every", 0, "--batch", 16, "--lr", 5, "--workers", 1])
    code, stderr = run_main("simclr.py", [*flags, "--out", out], capsys)
    line = stderr.strip().splitlines()[-1]
    assert code == 2 and "--epochs 1 (now 2), --batch 32 (now 16), --lr 0.001 (now 5.0);" in line
    assert "--workers" not in line  # allowed, so not among the refused


def test_a_resume_allows_and_records_what_does_not_change_the_result(trained, tmp_path, capsys):
    """--workers, --log-every, --knn-every and --ckpt-every change how the run is fed and watched: allowed, printed
    and kept in resumes.jsonl; the finished run trains no more."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    log = (out / "log.jsonl").read_text()
    flags = merge_flags(TINY, ["--epochs", 1, "--knn-every", 0, "--workers", 1, "--log-every", 3, "--ckpt-every", 2])
    common.run(lambda: simclr.main([*map(str, flags), "--out", str(out)]))
    stdout = capsys.readouterr().out
    assert "--workers 0 -> 1" in stdout and "--log-every 2 -> 3" in stdout and "--ckpt-every 0 -> 2" in stdout
    record = json.loads((out / "resumes.jsonl").read_text())
    assert record["changed"].pop("out") == [str(trained), str(out)]  # the folder was copied: a move is recorded too
    assert record == {"step": 4, "epoch": 1, "changed": {"workers": [0, 1], "log_every": [2, 3], "ckpt_every": [0, 2]}}
    assert (out / "log.jsonl").read_text() == log
    assert json.loads((out / "args.json").read_text())["workers"] == 1


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


def test_a_resume_refuses_a_training_set_that_changed(tmp_path, capsys):
    """Images added to the folder since the checkpoint: the arguments are the same, the data are not."""
    data = image_folder(tmp_path / "data", n_per_class=8)
    argv = [str(word) for word in [*FOLDER, "--knn-every", 0, "--data", data, "--out", tmp_path / "run"]]
    common.run(lambda: simclr.main(argv))  # 16 images: 2 steps an epoch
    image_folder(tmp_path / "data", n_per_class=12)  # 8 more
    before = snapshot(tmp_path / "run")
    code, stderr = run_main("simclr.py", argv, capsys)
    assert code == 2 and "was trained at 2 steps an epoch, the training set now gives 3: it changed" in stderr
    assert snapshot(tmp_path / "run") == before


def test_a_resume_within_an_epoch_refuses_another_process_count(tmp_path):
    args = SimpleNamespace(method="simclr", arch="resnet18", img_size=32, out=str(tmp_path))
    state = {"method": "simclr", "arch": "resnet18", "img_size": 32, "args": vars(args), "steps_per_epoch": 4}
    torch.save({**state, "resume_epoch": 0, "step": 3, "world": 1}, tmp_path / "checkpoint.pt")
    two = common.Env(torch.device("cpu"), world=2)
    with pytest.raises(common.UserError, match="written within epoch 0 by 1 processes: resume it on 1"):
        common.resume(args, two, None, None, None, 4, None)  # refused before anything is loaded


# ----------------------------------------------------------------------------------------------------------
# Data folders as users have them: each trains correctly or ends in one clear line

FOLDER = [*TINY, "--dataset", "folder", "--subset", 0, "--epochs", 1, "--knn-every", 1, "--batch", 8]


def test_a_folder_with_an_empty_class_stray_files_and_tiny_images_trains(tmp_path, capsys):
    data = image_folder(tmp_path / "data", n_per_class=8)
    (data / "train" / "bird").mkdir()  # a class folder with no images: a label without images
    for stray in (".DS_Store", "labels.csv", "README.txt"):
        (data / "train" / stray).write_text("not an image")
    (data / "train" / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 6), (200, 10, 10)).save(data / "train" / "dog" / "small.png")  # smaller than the 32 px crop
    ds = common.ImageFiles(str(data / "train"))
    assert ds.classes == ["bird", "cat", "dog"] and len(ds) == 17
    images = {f"{i:03d}.{'jpg' if i % 7 in (1, 5) else 'png'}" for i in range(8)} | {"small.png"}  # as image_folder
    assert {os.path.basename(path) for path, _ in ds.samples} == images
    assert ds[16][0].shape == (3, 6, 8)
    common.run(lambda: simclr.main([str(word) for word in [*FOLDER, "--data", data, "--out", tmp_path / "run"]]))
    log = common.read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [2] and "knn_top1" in log[-1]  # 17 images: 2 batches of 8
    assert "k-NN top-1" in capsys.readouterr().out


def test_an_unlabelled_folder_trains_with_the_knn_monitor_skipped(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "train").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "train" / f"{i}.jpg"
        )
    common.run(
        lambda: simclr.main([str(word) for word in [*FOLDER, "--data", tmp_path / "data", "--out", tmp_path / "run"]])
    )
    assert "k-NN monitor skipped: the data set has no labelled train/ and val/" in capsys.readouterr().out
    assert (tmp_path / "run" / "backbone.pt").exists()


def test_one_image_and_batch_2_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "train" / "cat" / "only.png")
    argv = merge_flags(FOLDER, ["--batch", 2, "--data", tmp_path / "data", "--out", tmp_path / "run"])
    code, stderr = run_main("simclr.py", argv, capsys)
    assert code == 2 and stderr.strip() == "error: 1 training images do not make one batch of 2; lower --batch"


def test_an_image_without_read_permission_is_named(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "data", n_per_class=4)
    locked = data / "train" / "cat" / "000.png"
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads any file: PIL then meets the error a user's process would
        real_open = Image.open

        def refuse(path, *args, **kwargs):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refuse)
    code, stderr = run_main("simclr.py", [*FOLDER, "--data", data, "--out", tmp_path / "run"], capsys)
    last = stderr.strip().split("\r")[-1]  # after the progress bar
    assert code == 2 and last.startswith(f"error: cannot read image {locked} (") and "Traceback" not in stderr
    assert "Permission denied" in last and last.endswith("remove or replace it")
