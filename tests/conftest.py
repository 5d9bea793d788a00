import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # the benchmarks' modules, which tests import
torch.set_num_threads(2)

METHODS = [m for m in ("simclr", "byol", "vicreg", "dino", "mae") if os.path.exists(os.path.join(ROOT, f"{m}.py"))]

# A tiny, fast configuration for end-to-end runs on CPU: ResNet-18 with the ImageNet stem at 32 px, 4 steps an epoch,
# in fp32 (--amp auto would pick bf16 on a CPU that has it).
TINY = ["--dataset", "synthetic", "--arch", "resnet18", "--stem", "imagenet", "--img-size", "32", "--batch", "32",
        "--subset", "128", "--workers", "0", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-epochs", "1",
        "--log-every", "2", "--knn-every", "2", "--amp", "off"]  # fmt: skip
# Small heads keep each method's TINY runs short.
EXTRA = {
    "simclr": [],
    "byol": ["--mlp", "64-32", "--ema", "0.99"],
    "vicreg": ["--mlp", "128-128-128"],
    "dino": ["--mlp", "64-64-32", "--out-dim", "128", "--local-crops", "2", "--warmup-teacher-temp-epochs", "2"],
    "mae": ["--arch", "vit_tiny", "--patch-size", "8", "--decoder-dim", "32", "--decoder-depth", "1"],
}
# Learning runs on synthetic data (ResNet-18, ImageNet stem, 32 px, AdamW, the full SimCLR colour distortion).
LEARN = ["--dataset", "synthetic", "--arch", "resnet18", "--stem", "imagenet", "--img-size", "32", "--batch", "64",
         "--workers", "2", "--optimizer", "adamw", "--lr", "2e-3", "--wd", "1e-4", "--warmup-epochs", "1",
         "--aug", "simclr", "--amp", "off"]  # fmt: skip
# DINO on the network and recipe of the CIFAR run (ResNet-18 a quarter wide with the CIFAR stem, BatchNorm head,
# no local crops, SGD), with K 256, EMA 0.9 (solo-learn's CIFAR momentum) and lr 0.3 so that 6 epochs suffice.
DINO_NET = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "0.25", "--stem", "cifar", "--img-size", "32",
            "--amp", "off"]  # fmt: skip
DINO_LEARN = [*DINO_NET, "--batch", "64", "--workers", "2", "--optimizer", "sgd", "--lr", "0.3", "--wd", "5e-4",
              "--wd-end", "5e-4", "--warmup-epochs", "1", "--aug", "simclr-cifar", "--bn-in-head", "1",
              "--local-crops", "0", "--out-dim", "256", "--ema", "0.9"]  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (learning, most subprocess runs); the quick tier skips it")


def merge_flags(*flag_lists):
    """One flag list from several, a later `--name value` replacing an earlier one (argparse checks a flag's
    choices at every occurrence, so mae.py refuses the `--arch resnet18` that a later `--arch vit_tiny` overrides).
    Flags without a value (`--gpu-aug`) are kept as they are."""
    merged = {}
    for flags in flag_lists:
        flags = [str(f) for f in flags]
        i = 0
        while i < len(flags):
            has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            merged[flags[i]] = flags[i + 1] if has_value else None
            i += 2 if has_value else 1
    return [word for name, value in merged.items() for word in ([name] if value is None else [name, value])]


# Intra-op threads of the runs a test compares bit for bit. With 2, about 1 run in 3 of a resumed SimCLR run with 2
# loader workers ended a last bit away from the uninterrupted one on an AVX-512 Xeon (0 in 7 with 1 thread).
EXACT = 1


def run_in_group(cmd, threads=2, timeout=600):
    """Run a command from the repository root in a process group of its own, on `threads` intra-op threads; returns
    the CompletedProcess. When the command has exited, or after a timeout, whatever is left of the group is killed:
    the loader workers of a SIGKILLed run would otherwise keep computing while the next run starts."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(cmd, cwd=ROOT, env=script_env(threads), start_new_session=True, **pipes) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{cmd[1:]} did not finish in {timeout} s") from None
        finally:
            kill_group(child.pid)
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def script_env(threads=2):
    """The environment of a script run: its thread count, MKL's fixed (MKL_DYNAMIC would lower it under load)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_DYNAMIC": "FALSE", "PYTHONWARNINGS": "ignore"}


def kill_group(group):
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # nothing left
        pass


def run_script(*argv, timeout=600, check=True, torchrun=0, threads=2):
    """Run a project script in a subprocess from the repository root; returns the CompletedProcess. Each torchrun
    process gets one thread."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    cmd = (prefix if torchrun else [sys.executable]) + [str(a) for a in argv]
    proc = run_in_group(cmd, threads=1 if torchrun else threads, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# Runs a script as __main__ after replacing torch.save by one that writes a few bytes and then SIGKILLs its own
# process on the N-th call: the kill lands in the middle of writing a checkpoint.
_KILL_DURING_SAVE = """
import os, runpy, signal, sys, torch
save, calls, kill_at = torch.save, [0], int(sys.argv.pop(1))
def dying_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        f.write(b"the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)
torch.save = dying_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def kill_during_save(argv, nth, threads=2):
    """Run a script that is killed (SIGKILL) half-way through its nth torch.save; returns the CompletedProcess."""
    proc = run_in_group([sys.executable, "-c", _KILL_DURING_SAVE, str(nth), *map(str, argv)], threads)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _entry(rank, fn, world, folder, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args):
    """Run fn(rank, world, *args) in `world` gloo processes; returns the list of their return values."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_entry, args=(fn, world, folder, args), nprocs=world)
        return [torch.load(f"{folder}/{r}.pt") for r in range(world)]


@pytest.fixture
def tiny():
    return list(TINY)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One finished 1-epoch SimCLR run (TINY, no k-NN), shared: tests copy it before writing into it."""
    out = tmp_path_factory.mktemp("trained")
    run_script("simclr.py", *TINY, "--epochs", 1, "--knn-every", 0, "--out", out)
    return out
