"""Speed of the project's augmentation pipelines and training steps, side by side with lightly.

Pipeline (the default): the method's augmentation recipe on one CPU core, as a loader worker runs it: decode,
draw the parameters, render the batch (uint8 views; the final normalisation happens on the training device).
No model. `--vs lightly` runs lightly's matching transform (PIL, one image at a time, then stacked as its
default collate does) on the same images in the same run, alternating rounds; each side reports its best round.

    python bench/speed.py --data ../shared/data/cifar10-subset/train --recipe simclr --img-size 32 --vs lightly
    python bench/speed.py --data /data/imagenet/train --recipe dino --img-size 224 --n 256 --vs lightly
    python bench/speed.py --data ../shared/data/cifar10-subset/train --upscale 500x375 --recipe dino --img-size 224

Step (`--step`): each method's training step (forward, backward, optimizer; no EMA or data) on a fixed random
batch, in images/s and FLOP/s, and as a fraction of the FLOP/s of a large fp32 matmul measured in the same run.

    python bench/speed.py --step --arch resnet18 --stem cifar --img-size 32 --batch 128 [--compile] [--amp bf16]

The last line printed is JSON. lightly is needed only for --vs lightly (`pip install lightly`), never by the
project.
"""

import argparse
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

METHODS = ("simclr", "byol", "vicreg", "dino", "mae")
CLASSES = {"simclr": "SimCLR", "byol": "BYOL", "vicreg": "VICReg", "dino": "DINO", "mae": "MAE"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--data", default=None, help="image folder (class sub-folders or images), for the pipeline")
    p.add_argument("--recipe", default="simclr", help=f"the method whose pipeline to measure: {', '.join(METHODS)}")
    p.add_argument("--img-size", type=int, default=32, help="view side (DINO: global crops; local: 96/224 of it)")
    p.add_argument("--local-crops", type=int, default=8, help="DINO's local crops (pipeline and step)")
    p.add_argument("--n", type=int, default=256, help="images per round")
    p.add_argument("--batch", type=int, default=64, help="images per rendered batch (pipeline) or per step (step)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side; the best counts")
    p.add_argument("--upscale", default=None, help="WxH: measure JPEG copies (quality 90) of the images at this size")
    p.add_argument("--vs", default=None, help="lightly: also measure lightly's matching transform")
    p.add_argument("--step", action="store_true", help="measure the training steps instead of the pipeline")
    p.add_argument("--methods", default=",".join(METHODS), help="methods for --step")
    p.add_argument("--arch", default="resnet18", help="backbone for --step (MAE and DINO: vit_tiny if a ResNet)")
    p.add_argument("--stem", default="auto", help="ResNet stem for --step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after 2 untimed)")
    p.add_argument("--amp", default="off", help="--step autocast: off, bf16 or fp16")
    p.add_argument("--compile", action="store_true", help="--step: torch.compile the model")
    p.add_argument("--threads", type=int, default=0, help="--step torch threads (0: all cores)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Pipelines


def our_recipe(recipe, size, local_crops):
    """The project's views for a method's default pipeline (CIFAR sizes: the CIFAR recipe lightly also uses)."""
    name = {"simclr": "simclr-cifar" if size <= 64 else "simclr", "vicreg": "vicreg-symmetric"}.get(recipe, recipe)
    patch = 16 if size >= 160 else 4
    return name, common.make_views(
        name, size, 0 if recipe == "dino" else 1 if recipe == "mae" else 2, local_crops, patch
    )


def lightly_transform(recipe, size, local_sizes):
    import lightly.transforms as L

    if recipe == "simclr":
        return (
            L.SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)
            if size <= 64
            else L.SimCLRTransform(input_size=size)
        )
    if recipe == "byol":
        return L.BYOLTransform(L.BYOLView1Transform(input_size=size), L.BYOLView2Transform(input_size=size))
    if recipe == "vicreg":
        return L.VICRegTransform(input_size=size)
    if recipe == "dino":
        local = local_sizes[0] if local_sizes else round(size * 96 / 224)
        return L.DINOTransform(global_crop_size=size, local_crop_size=local, n_local_views=len(local_sizes))
    if recipe == "mae":
        return L.MAETransform(input_size=size)
    raise common.UserError(f"unknown --recipe {recipe!r}; choose from {', '.join(METHODS)}")


def upscaled_copies(dataset, width, height, draft_side):
    import tempfile

    from PIL import Image

    folder = tempfile.mkdtemp(prefix="speed-jpegs-")
    for k, (path, _) in enumerate(dataset.samples):
        with Image.open(path) as im:
            im.convert("RGB").resize((width, height), Image.BICUBIC).save(f"{folder}/{k:05d}.jpg", quality=90)
    return common.ImageFiles(folder, draft_side=draft_side)


def time_ours(views, dataset, n, batch):
    augmented = common.Augmented(dataset, views.draw, seed=0)
    start = time.perf_counter()
    for first in range(0, n, batch):
        views.collate([augmented[(0, i)] for i in range(first, min(n, first + batch))])
    return n / (time.perf_counter() - start)


def time_lightly(transform, dataset, n, batch):
    from PIL import Image

    start = time.perf_counter()
    for first in range(0, n, batch):
        out = []
        for path, _ in dataset.samples[first : min(n, first + batch)]:
            with Image.open(path) as im:
                out.append(transform(im.convert("RGB")))
        [torch.stack(v) for v in zip(*out)]  # the default collate's work
    return n / (time.perf_counter() - start)


def bench_pipeline(args):
    if not args.data:
        raise common.UserError("--data is required for the pipeline benchmark (a folder of images)")
    torch.set_num_threads(1)  # one core: what one loader worker gets
    if args.recipe not in METHODS:
        raise common.UserError(f"unknown --recipe {args.recipe!r}; choose from {', '.join(METHODS)}")
    name, views = our_recipe(args.recipe, args.img_size, args.local_crops)
    dataset = common.ImageFiles(args.data, draft_side=max(views.sizes))
    dataset.samples = dataset.samples[:: max(1, len(dataset.samples) // args.n)][: args.n]  # spread over classes
    n = len(dataset.samples)
    if args.upscale:  # e.g. ImageNet-sized JPEGs made from CIFAR images, when no large images are at hand
        dataset = upscaled_copies(dataset, *map(int, args.upscale.split("x")), max(views.sizes))
    lightly = lightly_transform(args.recipe, args.img_size, views.sizes[2:]) if args.vs == "lightly" else None
    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(time_ours(views, dataset, n, args.batch))
        if lightly is not None:
            theirs.append(time_lightly(lightly, dataset, n, args.batch))
        print(f"round {r}: ours {ours[-1]:.1f} img/s" + (f", lightly {theirs[-1]:.1f} img/s" if theirs else ""))
    result = {"recipe": args.recipe, "aug": name, "img_size": args.img_size, "views": views.sizes, "n": n,
                  "img_per_s_per_core": round(max(ours), 1)}  # fmt: skip
    if theirs:
        result.update(lightly_img_per_s_per_core=round(max(theirs), 1), ratio=round(max(ours) / max(theirs), 2))
    return result


# ----------------------------------------------------------------------------------------------------------
# Training steps


def matmul_flops(device, size=2048, repeat=5, dtype=torch.float32):
    """FLOP/s of a square matmul: the ceiling the training steps are measured against."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * size**3 * repeat / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, inputs, optimizer, amp, scaler):
    with amp():
        loss, _ = model(inputs)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def bench_step(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceiling = matmul_flops(device)
    results = []
    for method in args.methods.split(","):
        if method not in METHODS:
            raise common.UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        module = importlib.import_module(method)
        arch = "vit_tiny" if method == "mae" and not args.arch.startswith("vit") else args.arch
        argv = ["--arch", arch, "--stem", args.stem, "--img-size", str(args.img_size), "--batch", str(args.batch),
                "--amp", args.amp, "--out", "/tmp/bench-unused", "--optimizer", "adamw"]  # fmt: skip
        argv += ["--local-crops", str(args.local_crops)] if method == "dino" else []
        margs = module.get_args(argv + (["--compile"] if args.compile else []))
        env = common.Env(device)
        torch.manual_seed(0)
        net = getattr(module, CLASSES[method])(margs).to(device)
        model = common.distribute(net, margs, env)
        optimizer = common.build_optimizer(margs, env, net, 1e-4)
        amp, scaler = common.autocast(margs, env)
        consumed = (0, margs.local_crops, margs.patch_size) if method == "dino" else (1,) if method == "mae" else ()
        views = common.make_views(margs.aug, margs.img_size, *consumed)
        flops = common.count_step_flops(net, views.sizes, margs, env)
        batch = [torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8) for s in views.sizes]
        inputs = common.to_device(batch, margs, env)

        for _ in range(2):
            train_step(model, inputs, optimizer, amp, scaler)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, inputs, optimizer, amp, scaler)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        row = {"method": method, "arch": arch, "views": views.sizes, "img_per_s": round(args.batch / seconds, 1)}
        row.update(flop_per_s=f"{flops / seconds:.3g}", fraction_of_matmul=round(flops / seconds / ceiling, 3))
        print(row)
        results.append(row)
    report = {"device": str(device), "threads": torch.get_num_threads(), "amp": args.amp, "compile": args.compile}
    report.update(batch=args.batch, img_size=args.img_size, matmul_flop_per_s=f"{ceiling:.3g}", steps=results)
    return report


def main(argv=None):
    args = get_args(argv)
    print(json.dumps(bench_step(args) if args.step else bench_pipeline(args)))


if __name__ == "__main__":
    common.run(main)
