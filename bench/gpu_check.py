"""The GPU path proven in one prepared run: the five scripts' real main() on one CUDA device at ImageNet shapes,
in bf16 with torch.compile and in fp16 with its GradScaler; --gpu-aug against the loader workers; torchrun (NCCL,
SyncBatchNorm, DDP); a kill and a resume; eval_linear.py on a backbone the check trained.

    python bench/gpu_check.py --out /tmp/gpu-check               # one CUDA device, under 7 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check     # CPU: tiny models, every check but CUDA's own
    python bench/gpu_check.py --out /tmp/gpu-check --checks dino-bf16,resume    # rerun some checks

Each check runs in processes of its own, so a crash or a hang costs that check only (a timeout per check; a check
that no longer fits in --time-limit is skipped, and --checks reruns it). <out>/gpu_check.json, the only file
written there, holds one entry per check and is rewritten after every check, so a run cut short keeps what it
measured; stdout ends with a table. The runs themselves (checkpoints of up to 1.4 GB) go to --runs, by default a
temporary folder removed at the end. A training check reports images/s after warm-up (the median of log.jsonl's
intervals after the first, which holds the compilation), peak GPU memory during training, the step's FLOP/s (the
project's own FLOP counter) as a fraction of a large bf16 matmul's measured in the same process, the final loss
(it must be finite), and the path the shared helpers took: compiled, DDP, process-group backend, SyncBatchNorm
layers, channels_last, autocast dtype, GradScaler, the optimizer and whether it is fused, pinned memory. Exit code
0 when every check passed, else 1. docs/gpu.md lists the checks and what each must show.

The networks are the scripts' defaults at 224 px: ResNet-50 for SimCLR, BYOL and VICReg, ViT-S/16 with 2 global
and 8 local crops for DINO, ViT-B/16 for MAE, on the synthetic data set (no files needed), batch 128.

--dry-run runs every check on the CPU (any GPU hidden) with tiny networks at 32 px, so that a test proves the check
itself works. It leaves out what only CUDA has or what would take minutes on two cores: torch.compile, NCCL and
SyncBatchNorm (torchrun then runs DDP over gloo), GPU memory, pinned memory, fused AdamW, and bf16 and fp16
autocast (on a CPU without native bf16 they run about 100x slower): its bf16 and fp16 checks train in fp32 (the
test suite covers autocast on the CPU).
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
from speed import matmul_flops

import common

METHODS = ("simclr", "byol", "vicreg", "dino", "mae")
REPORT_MARK = "GPU_CHECK_REPORT "  # the child's last stdout line: its report as JSON
KILL_AFTER_CHECKPOINT = "GPU_CHECK_KILL_AFTER_CHECKPOINT"  # env: SIGKILL itself at the first interval after a save

# The scripts' default networks at ImageNet shapes, and tiny ones for the CPU dry run; the batch is apart.
FULL_BATCH, TINY_BATCH = 128, 16
FULL = {
    "common": ["--dataset", "synthetic", "--img-size", "224"],
    "simclr": [],
    "byol": [],
    "vicreg": [],
    "dino": [],
    "mae": [],
}
TINY = {
    "common": ["--dataset", "synthetic", "--img-size", "32"],
    "simclr": ["--arch", "resnet18", "--width", "0.25", "--mlp", "64-32"],
    "byol": ["--arch", "resnet18", "--width", "0.25", "--mlp", "64-32"],
    "vicreg": ["--arch", "resnet18", "--width", "0.25", "--mlp", "64-64-64"],
    "dino": ["--arch", "vit_tiny", "--patch-size", "8", "--local-crops", "2", "--mlp", "64-64-32", "--out-dim", "128"],
    "mae": ["--arch", "vit_tiny", "--patch-size", "8", "--decoder-dim", "32", "--decoder-depth", "1"],
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--out", required=True, help="folder for the report, gpu_check.json (its only file)")
    p.add_argument("--runs", default=None, help="folder for the runs it trains (default: a temporary one, removed)")
    p.add_argument("--dry-run", action="store_true", help="run every check on the CPU with tiny networks")
    p.add_argument("--checks", default="all", help="comma-separated check names (see the table), or all")
    p.add_argument("--steps", type=int, default=None, help="steps of each bf16 run, 6 to 31 (default 30; dry run 6)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the cores less 2; dry run 1)")
    p.add_argument("--time-limit", type=float, default=390, help="seconds for the whole check; later checks skip")
    args = p.parse_args(argv)
    if args.steps is not None and not 6 <= args.steps <= 31:
        raise common.UserError(f"--steps {args.steps}: give 6 to 31 (the synthetic set holds 31 batches of 128)")
    if args.workers is not None and args.workers < 0:
        raise common.UserError(f"--workers {args.workers}: give 0 or more")
    if not args.dry_run and not torch.cuda.is_available():
        raise common.UserError("no CUDA device here: run on a GPU machine, or add --dry-run to check on the CPU")
    return args


# ----------------------------------------------------------------------------------------------------------
# Inside a check's process: one script's main(), watched through the shared helpers it calls by name.


def watch(path):
    """Wrap the common helpers main() calls so that `path` records what each chose."""
    distribute, build_optimizer, autocast = common.distribute, common.build_optimizer, common.autocast
    count_step_flops, train_loader = common.count_step_flops, common.train_loader

    def watched_distribute(net, args, env):
        model = distribute(net, args, env)
        inner = getattr(model, "_orig_mod", model)
        path.update(
            compiled=inner is not model,
            ddp=isinstance(inner, nn.parallel.DistributedDataParallel),
            backend=dist.get_backend() if dist.is_initialized() else None,
            sync_bn_layers=sum(isinstance(m, nn.SyncBatchNorm) for m in inner.modules()),
        )
        if args.arch.startswith("resnet"):
            conv = next(p for p in net.parameters() if p.dim() == 4)
            path["channels_last"] = conv.is_contiguous(memory_format=torch.channels_last)
        return model

    def watched_build_optimizer(*a, **k):
        optimizer = build_optimizer(*a, **k)
        path.update(optimizer=type(optimizer).__name__, fused=bool(optimizer.defaults.get("fused")))
        return optimizer

    def watched_autocast(args, env):
        amp, scaler = autocast(args, env)
        enabled = amp.keywords["enabled"]
        path.update(autocast=str(amp.keywords["dtype"]).replace("torch.", "") if enabled else "off")
        path.update(grad_scaler=scaler.is_enabled())
        return amp, scaler

    def watched_count_step_flops(*a, **k):
        flops = count_step_flops(*a, **k)
        if torch.cuda.is_available():  # the count runs a full-batch fp32 step: not the training's peak
            torch.cuda.reset_peak_memory_stats()
        return flops

    def watched_train_loader(*a, **k):
        loader = train_loader(*a, **k)
        path.update(workers=loader.num_workers, pin_memory=loader.pin_memory)
        return loader

    common.distribute, common.build_optimizer = watched_distribute, watched_build_optimizer
    common.autocast, common.train_loader = watched_autocast, watched_train_loader
    common.count_step_flops = watched_count_step_flops


def kill_after_checkpoint():
    """A preemption without warning: SIGKILL at the first logged interval after the first checkpoint, so the log
    holds records the checkpoint does not (the resume must drop them)."""
    save_checkpoint, saved = common.save_checkpoint, []

    def save_then_arm(*a, **k):
        save_checkpoint(*a, **k)
        saved.append(True)

    class KilledLog(common.TrainLog):
        def write_interval(self, *a, **k):
            mean_loss = super().write_interval(*a, **k)
            if saved:
                os.kill(os.getpid(), signal.SIGKILL)
            return mean_loss

    common.save_checkpoint, common.TrainLog = save_then_arm, KilledLog


def child(method, argv):
    """Run `method`'s main(argv) in this process, then print its report: the path, peak memory, matmul FLOP/s."""
    module = importlib.import_module(method)
    path = {}
    watch(path)
    if os.environ.get(KILL_AFTER_CHECKPOINT) == "1":
        kill_after_checkpoint()
    common.run(lambda: module.main(argv))  # which ends torchrun's process group
    report = {"path": path}
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        report["device"] = torch.cuda.get_device_name(device)
        report["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        report["matmul_flop_per_s"] = matmul_flops(device, 8192, 10, torch.bfloat16)
    else:
        report.update(device="cpu", peak_mem_gib=None)
        report["matmul_flop_per_s"] = matmul_flops(torch.device("cpu"), 512, 5)  # fp32: the CPU's fast path
    if os.environ.get("RANK", "0") == "0":
        print(REPORT_MARK + json.dumps(report), flush=True)


# ----------------------------------------------------------------------------------------------------------
# The checks, each in processes of its own


class Checker:
    """Runs the checks in order, within the time limit, and rewrites the report after each."""

    def __init__(self, args):
        self.args, self.start, self.entries = args, time.perf_counter(), []
        self.sizes, self.batch = (TINY, TINY_BATCH) if args.dry_run else (FULL, FULL_BATCH)
        self.steps = args.steps or (6 if args.dry_run else 30)
        cores = len(os.sched_getaffinity(0))  # a container's share, not the host's count
        self.workers = args.workers if args.workers is not None else 1 if args.dry_run else min(max(cores - 2, 1), 14)
        self.report_path = os.path.join(args.out, "gpu_check.json")
        self.runs = args.runs or tempfile.mkdtemp(prefix="gpu-check-runs-")
        self.device = "cpu" if args.dry_run else "cuda"  # the name a run reports replaces it

    def flags(self, method, steps, epochs=1, amp="bf16"):
        """A short run of `method`: `steps` steps an epoch (a subset of steps x batch images), no k-NN monitor."""
        amp = "off" if self.args.dry_run else amp  # see the docstring
        flags = [*self.sizes["common"], *self.sizes[method], "--batch", str(self.batch), "--amp", amp]
        flags += ["--workers", str(self.workers)]
        flags += ["--subset", str(steps * self.batch), "--epochs", str(epochs), "--knn-every", "0"]
        return flags + ["--log-every", str(max(1, steps // 6))]

    def remaining(self):
        return self.args.time_limit - (time.perf_counter() - self.start)

    def launch(self, cmd, name, timeout, env=None):
        """Run cmd in a session of its own, its stdout and stderr in files (no pipe for a stray process to hold
        open); returns (the exit code or "timeout", stdout, stderr). The dry run hides any GPU from it."""
        paths = [os.path.join(self.runs, f"{name}.{stream}") for stream in ("stdout", "stderr")]
        with open(paths[0], "w") as out, open(paths[1], "w") as err:
            env = {**os.environ, **(env or {}), **({"CUDA_VISIBLE_DEVICES": ""} if self.args.dry_run else {})}
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                code = "timeout"
                proc.terminate()  # torchrun passes SIGTERM on to its workers (sessions of their own), 30 s to stop
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=40)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # loader workers left behind by a killed run
            proc.wait()
        with open(paths[0]) as out, open(paths[1]) as err:
            return code, out.read(), err.read()

    def train(self, method, folder, flags, timeout, torchrun=False, env=None, fresh=True):
        """One training run through child() in runs/<folder> (emptied first unless not fresh); returns its exit
        code, report, log records (the intervals), stdout and error."""
        out = os.path.join(self.runs, folder)
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, os.path.abspath(__file__), "child", method, *flags, "--out", out]
        if torchrun:
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        code, stdout, stderr = self.launch(cmd, folder, min(timeout, self.remaining()), env)
        reports = [json.loads(line[len(REPORT_MARK) :]) for line in stdout.splitlines() if line.startswith(REPORT_MARK)]
        records = [r for r in common.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
        run = {"returncode": code, "report": reports[-1] if reports else None, "records": records}
        if reports:
            self.device = reports[-1]["device"]
        run.update(stdout=stdout, error=stderr.strip()[-1500:] if code != 0 else None)
        return run

    def measure(self, run):
        """The numbers of a finished training run (see the docstring)."""
        records, report = run["records"], run["report"]
        after_warmup = [r["img_per_s"] for r in records[1:]] or [r["img_per_s"] for r in records]
        img_per_s = statistics.median(after_warmup)
        flops_per_step = records[-1]["flops"] / records[-1]["step"]
        numbers = {"img_per_s": round(img_per_s, 1), "steps": records[-1]["step"], "final_loss": records[-1]["loss"]}
        numbers["losses"] = [round(r["loss"], 4) for r in records]
        numbers["first_interval_s"] = records[0]["time"]  # start-up of the loop and compilation included
        numbers.update(peak_mem_gib=report["peak_mem_gib"], flops_per_step=flops_per_step)
        numbers["matmul_flop_per_s"] = report["matmul_flop_per_s"]
        numbers["fraction_of_matmul"] = round(flops_per_step * img_per_s / self.batch / report["matmul_flop_per_s"], 3)
        return {**numbers, "path": report["path"]}

    def check_training(self, name, method, compile_, amp, steps, timeout):
        flags = self.flags(method, steps, amp=amp) + (["--compile"] if compile_ else [])
        run = self.train(method, name, flags, timeout)
        if not self.finished(run):
            return self.failed(run, "the run did not finish")
        numbers = self.measure(run)
        if not math.isfinite(numbers["final_loss"]):
            return {"ok": False, **numbers, "error": "non-finite loss"}
        return {"ok": True, **numbers}

    @staticmethod
    def finished(run):
        """The run ended well, logged its intervals and printed its report."""
        return run["returncode"] == 0 and run["records"] and run["report"] is not None

    def failed(self, run, why):
        if run["returncode"] == "timeout":
            return {"ok": False, "returncode": "timeout", "error": f"{why}: timed out"}
        return {"ok": False, "returncode": run["returncode"], "error": f"{why}: {run['error'] or run['stdout'][-500:]}"}

    def check_gpu_aug(self, timeout):
        """BYOL (every colour op, blur and solarize) rendered by the loader workers and with --gpu-aug on the
        device from the same draws: the first step's loss agrees within 3%. Both with 4 loader workers."""
        runs = {}
        for label, extra in (("workers", []), ("gpu_aug", ["--gpu-aug"])):
            # 4 workers prefetch 8 batches: the later steps show the pipeline's pace, not the prefetched batches'
            flags = [
                *self.flags("byol", self.steps),
                *extra,
                "--log-every",
                "1",
                "--workers",
                str(min(4, self.workers)),
            ]
            runs[label] = run = self.train("byol", f"gpu-aug-{label}", flags, timeout / 2)
            if not self.finished(run):
                return self.failed(run, f"the {label} run did not finish")
        first = {label: run["records"][0]["loss"] for label, run in runs.items()}
        speed = {label: self.measure(run)["img_per_s"] for label, run in runs.items()}
        gap = abs(first["gpu_aug"] - first["workers"]) / abs(first["workers"])
        result = {"ok": gap < 0.03, "first_loss": first, "relative_gap": round(gap, 5), "img_per_s": speed}
        return {**result, "path": runs["gpu_aug"]["report"]["path"]}

    def check_torchrun(self, timeout):
        """torchrun --standalone --nproc_per_node=1 simclr.py: the process group (NCCL on CUDA), DDP, and on CUDA
        SyncBatchNorm."""
        run = self.train("simclr", "torchrun", self.flags("simclr", self.steps // 3), timeout, torchrun=True)
        if not self.finished(run):
            return self.failed(run, "the run did not finish")
        path = run["report"]["path"]
        cuda = not self.args.dry_run
        expected = {"ddp": True, "backend": "nccl" if cuda else "gloo"}
        wrong = {k: path.get(k) for k, v in expected.items() if path.get(k) != v}
        if cuda and not path.get("sync_bn_layers"):
            wrong["sync_bn_layers"] = path.get("sync_bn_layers")
        final = run["records"][-1]["loss"]
        ok = not wrong and math.isfinite(final)
        return {"ok": ok, "final_loss": final, "path": path, **({"error": f"unexpected {wrong}"} if wrong else {})}

    def check_resume(self, timeout):
        """SimCLR, 3 epochs: SIGKILL at the first interval after epoch 0's checkpoint, then the same command again.
        The rerun resumes at epoch 1, drops the killed run's later records, retrains the lost interval to the
        killed run's loss within 2% (the same state and data), and ends after all the steps with a finite loss."""
        steps = self.steps // 3
        flags = [*self.flags("simclr", steps, epochs=3), "--log-every", "2"]
        killed = self.train("simclr", "resume", flags, timeout / 2, env={KILL_AFTER_CHECKPOINT: "1"})
        logged = [r["step"] for r in killed["records"]]
        if killed["returncode"] != -signal.SIGKILL or not logged or logged[-1] <= steps:
            return self.failed(killed, f"not killed after the first checkpoint (steps logged: {logged})")
        rerun = self.train("simclr", "resume", flags, timeout / 2, fresh=False)
        if not self.finished(rerun):
            return self.failed(rerun, "the resumed run did not finish")
        final_steps = [r["step"] for r in rerun["records"]]
        killed_loss = killed["records"][-1]["loss"]  # the interval after the checkpoint, lost with the kill
        resumed_loss = next(r["loss"] for r in rerun["records"] if r["step"] == logged[-1])
        gap = abs(resumed_loss - killed_loss) / abs(killed_loss)
        checks = {
            "resumed at the checkpoint": f"resume{os.sep}checkpoint.pt in epoch 1 at step {steps}" in rerun["stdout"],
            "the killed run's records dropped, each step once": final_steps == sorted(set(final_steps)),
            "all the steps ran": final_steps[-1] == 3 * steps,
            "finite loss": math.isfinite(rerun["records"][-1]["loss"]),
            "the lost interval retrained alike (2%)": gap < 0.02,  # same state and data; CUDA: not bit for bit
        }
        failed = [name for name, ok in checks.items() if not ok]
        result = {"ok": not failed, "killed_after_step": logged[-1], "checkpoint_step": steps}
        result.update(killed_loss=killed_loss, resumed_loss=resumed_loss, logged_steps=final_steps)
        result["losses"] = [round(r["loss"], 4) for r in rerun["records"]]
        return {**result, **({"error": f"failed: {', '.join(failed)}"} if failed else {})}

    def check_eval(self, timeout):
        """eval_linear.py (features protocol, 5 epochs) on the first backbone.pt this check trained."""
        folders = ["resume", "simclr-bf16", "torchrun"]
        ckpt = next((c for f in folders if os.path.isfile(c := os.path.join(self.runs, f, "backbone.pt"))), None)
        if ckpt is None:
            return {"ok": False, "error": "no backbone.pt: the training checks failed or were skipped"}
        result_path = os.path.join(self.runs, "eval.json")
        cmd = [sys.executable, os.path.join(ROOT, "eval_linear.py"), "--ckpt", ckpt, "--epochs", "5"]
        cmd += ["--workers", str(self.workers), "--out", result_path]
        code, stdout, stderr = self.launch(cmd, "eval", min(timeout, self.remaining()))
        if code != 0 or not os.path.isfile(result_path):
            return {"ok": False, "returncode": code, "error": stderr.strip()[-1500:] or stdout[-500:]}
        with open(result_path) as f:
            result = json.load(f)
        return {**result, "ok": math.isfinite(result["linear_top1"]), "ckpt": os.path.relpath(ckpt, self.runs)}

    def plan(self):
        """(name, seconds it is expected to need on one GPU, function) of every check, in the order they run: a run
        cut short by --time-limit has covered the most ground (the three networks compiled, then each other path
        once, then the rest)."""
        compiled = not self.args.dry_run

        def bf16(m):
            return f"{m}-bf16", 120, lambda: self.check_training(f"{m}-bf16", m, compiled, "bf16", self.steps, 300)

        def fp16(m):
            return f"{m}-fp16", 30, lambda: self.check_training(f"{m}-fp16", m, False, "fp16", self.steps // 3, 120)

        checks = [bf16("simclr"), bf16("dino"), bf16("mae")]
        checks += [
            ("gpu-aug", 60, lambda: self.check_gpu_aug(180)),
            ("torchrun", 30, lambda: self.check_torchrun(150)),
            ("resume", 50, lambda: self.check_resume(180)),
            ("eval", 30, lambda: self.check_eval(120)),
        ]
        return checks + [fp16(m) for m in METHODS] + [bf16("byol"), bf16("vicreg")]

    def run(self):
        checks = self.plan()
        names = [name for name, _, _ in checks]
        chosen = names if self.args.checks == "all" else self.args.checks.split(",")
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise common.UserError(f"unknown --checks {','.join(unknown)}; choose from {', '.join(names)} or all")
        os.makedirs(self.args.out, exist_ok=True)
        os.makedirs(self.runs, exist_ok=True)
        for name, expected_s, check in checks:
            if name not in chosen:
                continue
            started = time.perf_counter()
            if self.remaining() < (10 if self.args.dry_run else expected_s):  # skipped, not cut short and failed
                entry = {"ok": False, "skipped": f"--time-limit {self.args.time_limit:g} s: {expected_s} s needed"}
            else:
                try:
                    entry = check()
                except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OSError) as e:
                    entry = {"ok": False, "error": f"the check could not read its runs: {type(e).__name__}: {e}"}
            self.entries.append({"check": name, **entry, "seconds": round(time.perf_counter() - started, 1)})
            print(row(self.entries[-1]), flush=True)
            self.write_report()
        return all(entry["ok"] for entry in self.entries)

    def write_report(self):
        report = {"device": self.device, "dry_run": self.args.dry_run, "torch": torch.__version__}
        report["cuda"] = torch.version.cuda
        report.update(batch=self.batch, steps=self.steps, workers=self.workers, checks=self.entries)
        report["seconds"] = round(time.perf_counter() - self.start, 1)
        common.write_json(f"{self.report_path}.tmp", report)
        os.replace(f"{self.report_path}.tmp", self.report_path)


def row(entry):
    """One line of the stdout table."""

    def number(key, fmt):
        value = entry.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    result = "ok" if entry["ok"] else "SKIPPED" if "skipped" in entry else "FAILED"
    cells = [f"{entry['check']:<14}", f"{result:<7}", f"{number('img_per_s', '9.1f'):>9}"]
    cells += [f"{number('peak_mem_gib', '7.2f'):>7}", f"{number('fraction_of_matmul', '6.3f'):>6}"]
    cells += [f"{number('final_loss', '9.4f'):>9}", f"{entry['seconds']:6.1f}"]
    note = entry.get("error") or entry.get("skipped") or ""
    return "  ".join(cells) + ("  " + note.splitlines()[-1][:120] if note else "")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1], argv[2:])
    args = get_args(argv)
    checker = Checker(args)
    print(f"{'check':<14}  {'result':<7}  {'img/s':>9}  {'GiB':>7}  {'of mm':>6}  {'loss':>9}  {'s':>6}")
    try:
        ok = checker.run()
    finally:
        if args.runs is None:
            shutil.rmtree(checker.runs, ignore_errors=True)
    print(f"report: {checker.report_path} ({'all passed' if ok else 'FAILURES'})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    common.run(main)
