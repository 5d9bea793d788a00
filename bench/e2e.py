"""End to end, SimCLR ResNet-18 on CIFAR-size images: simclr.py against the same training written with lightly.

Both train the same network, a ResNet-18 with the CIFAR stem at 32 px (full width and a quarter wide, by
default both), on an image folder (its first --steps x --batch images): batch 128, projector to 2048-128,
temperature 0.1, SGD, 2 loader workers, the same precision (--amp: fp32 or bf16 autocast), and report images/s
over the second half of the steps (after start-up). The lightly side is what a lightly user would write: lightly's
SimCLRTransform (CIFAR settings: colour strength 0.5, no blur), SimCLRProjectionHead and NTXentLoss, a torchvision
ImageFolder and a plain DataLoader, around the project's ResNet (torchvision's, narrowed for the quarter width).

    python bench/e2e.py --data ../shared/data/cifar10-subset --steps 16

The last line printed is JSON. lightly is needed only here (`pip install lightly`), never by the project.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from speed import machine

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root holding train/")
    p.add_argument("--steps", type=int, default=16, help="training steps per side (even); the second half is timed")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--widths", default="1,0.25", help="ResNet-18 widths to measure, comma-separated")
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="both sides: fp32 (off) or bf16 autocast")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per side; the best counts")
    return p.parse_args(argv)


def ours(args, width):
    """simclr.py itself on a --subset of steps x batch images for one epoch; images/s from log.jsonl's times."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "simclr.py"), "--dataset", "folder", "--data", args.data,
               "--subset", str(args.steps * args.batch), "--epochs", "1", "--arch", "resnet18", "--width", str(width),
               "--stem", "cifar", "--img-size", "32", "--batch", str(args.batch), "--workers", str(args.workers),
               "--aug", "simclr-cifar", "--optimizer", "sgd", "--lr", "0.06", "--wd", "5e-4", "--mlp", "2048-128",
               "--amp", args.amp, "--knn-every", "0", "--log-every", str(args.steps // 2), "--out", out]  # fmt: skip
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode:
            raise common.UserError(f"simclr.py failed: {proc.stderr.strip().splitlines()[-1]}")
        times = [r["time"] for r in common.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
    return args.steps // 2 * args.batch / (times[1] - times[0])


def lightly_run(args, width):
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    dataset = torchvision.datasets.ImageFolder(
        os.path.join(args.data, "train"), transform=SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    )
    dataset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset))[: args.steps * args.batch].tolist())
    loader = torch.utils.data.DataLoader(dataset, args.batch, shuffle=True, drop_last=True, num_workers=args.workers)
    resnet = common.ResNet("resnet18", width, cifar_stem=True)  # torchvision's ResNet-18, its stem made CIFAR's
    model = nn.Sequential(resnet, SimCLRProjectionHead(resnet.embed_dim, 2048, 128))
    criterion = NTXentLoss(temperature=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * args.batch / 256, momentum=0.9, weight_decay=5e-4)
    autocast = torch.autocast("cpu", torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    for step, ((x0, x1), _) in enumerate(loader):
        if step == args.steps // 2:
            start = time.perf_counter()
        with autocast:
            loss = criterion(model(x0), model(x1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % (args.steps // 2) == 0:
            loss.item()  # lightly's examples log the loss; the timed half ends on the same kind of step
    return args.steps // 2 * args.batch / (time.perf_counter() - start)


def main(argv=None):
    args = get_args(argv)
    widths = [float(w) for w in args.widths.split(",")]
    result = {"machine": machine(), "batch": args.batch, "workers": args.workers, "steps": args.steps}
    result.update(amp=args.amp, runs=[])
    for width in widths:
        best = {"ours": 0.0, "lightly": 0.0}
        for r in range(args.rounds):
            best["ours"] = max(best["ours"], mine := ours(args, width))
            best["lightly"] = max(best["lightly"], theirs := lightly_run(args, width))
            print(f"width {width} round {r}: simclr.py {mine:.1f} img/s, lightly {theirs:.1f} img/s")
        run = {"width": width, "simclr_py_img_per_s": round(best["ours"], 1)}
        run.update(lightly_img_per_s=round(best["lightly"], 1), ratio=round(best["ours"] / best["lightly"], 2))
        result["runs"].append(run)
    print(json.dumps(result))


if __name__ == "__main__":
    common.run(main)
