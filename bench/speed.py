"""Speed of the project's augmentation pipelines and training steps, side by side with lightly.

Pipeline (the default): each method's augmentation recipe on one CPU core, as a loader worker runs it: decode,
draw the parameters, render the batch (uint8 views; the final normalisation happens on the training device).
No model. In one run, per recipe: decode only and decode + crops and resizes (the ceilings), the full pipeline,
lightly's matching transform (`--vs lightly`: PIL, one image at a time, stacked as its default collate does), the
pipeline's share of each ceiling, and where the full pipeline's time goes, stage by stage. Rounds alternate
between the sides; each reports its best round. `--make-jpegs N --side S` first writes N S x S JPEGs (quality 90,
bicubic) from the images under --data, for a test set like ImageNet-style training data when none is at hand.

    python bench/speed.py --data ../shared/data/cifar10-subset/train --make-jpegs 256 --side 224 --vs lightly
    python bench/speed.py --data /data/imagenet/train --recipe dino --img-size 224 --n 256 --vs lightly

Step (`--step`): each method's training step (forward, backward, optimizer; no EMA or data) on a fixed random
batch, in images/s and FLOP/s, and as a fraction of the FLOP/s of a large fp32 matmul measured in the same run.

    python bench/speed.py --step --arch resnet18 --stem cifar --img-size 32 --batch 128 [--compile] [--amp bf16]

The last line printed is JSON. lightly is needed only for --vs lightly (`pip install lightly`), never by the
project.
"""

import argparse
import collections
import copy
import functools
import importlib
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

METHODS = ("simclr", "byol", "vicreg", "dino", "mae")
CLASSES = {"simclr": "SimCLR", "byol": "BYOL", "vicreg": "VICReg", "dino": "DINO", "mae": "MAE"}
# --recipe all: the view sizes users train at (SimCLR also at CIFAR's 32 px)
ALL_RECIPES = (("simclr", 32), ("simclr", 224), ("byol", 224), ("vicreg", 224), ("mae", 224), ("dino", 224))
# The full pipeline's stages, as common.py names them: each is timed where the pipeline calls it.
STAGES = ("decode_image", "draw", "cut_crops", "brightness", "contrast", "saturation", "hue", "random_grayscale",
          "random_blur", "random_solarize", "to_uint8")  # fmt: skip
COLOR_OPS = ("brightness", "contrast", "saturation", "hue")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--data", default=None, help="image folder (class sub-folders or images), for the pipeline")
    p.add_argument(
        "--recipe", default="all", help=f"all, or the method whose pipeline to measure: {', '.join(METHODS)}"
    )
    p.add_argument(
        "--img-size", type=int, default=224, help="view side with --recipe (DINO: global crops; local: 96/224)"
    )
    p.add_argument("--local-crops", type=int, default=8, help="DINO's local crops (pipeline and step)")
    p.add_argument("--n", type=int, default=256, help="images per round")
    p.add_argument("--batch", type=int, default=64, help="images per rendered batch (pipeline) or per step (step)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side; the best counts")
    p.add_argument("--make-jpegs", type=int, default=0, help="N: measure N JPEG copies (quality 90) of --data's images")
    p.add_argument("--side", type=int, default=224, help="--make-jpegs: the copies' side (square)")
    p.add_argument("--vs", default=None, help="lightly: also measure lightly's matching transform")
    p.add_argument("--step", action="store_true", help="measure the training steps instead of the pipeline")
    p.add_argument("--methods", default=",".join(METHODS), help="methods for --step")
    p.add_argument("--arch", default="resnet18", help="backbone for --step (MAE and DINO: vit_tiny if a ResNet)")
    p.add_argument("--stem", default="auto", help="ResNet stem for --step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after 2 untimed)")
    p.add_argument("--amp", default="off", help="--step autocast: off, auto, bf16 or fp16")
    p.add_argument("--compile", action="store_true", help="--step: torch.compile the model")
    p.add_argument("--threads", type=int, default=0, help="--step torch threads (0: all cores)")
    return p.parse_args(argv)


def machine():
    """The CPU's model name, and whether it has the bf16 instructions (for the reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or [f for f in ("avx512f", "avx2") if f in flags][
        :1
    ]
    return f"{name} ({', '.join(extras)})" if extras else name


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
    raise common.UserError(f"unknown --recipe {recipe!r}; choose all or one of {', '.join(METHODS)}")


def make_jpegs(samples, side):
    """side x side JPEG copies (quality 90, bicubic) of the images, in a new temporary folder."""
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="speed-jpegs-")
    for k, (path, _) in enumerate(samples):
        with Image.open(path) as im:
            im.convert("RGB").resize((side, side), Image.BICUBIC).save(f"{folder}/{k:05d}.jpg", quality=90)
    return folder


def time_decode(views, dataset, n, batch):
    """Ceiling 1: decoding only (at the size the pipeline decodes)."""
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


def time_crops(views, dataset, n, batch):
    """Ceiling 2: decoding, drawing every view's parameters and cutting, resizing and flipping its crop into the
    batch's floats (no colour or blur), batched as the pipeline does."""
    augmented = common.Augmented(dataset, views.draw, seed=0)
    start = time.perf_counter()
    for first in range(0, n, batch):
        images, params = zip(*[augmented[(0, i)][0] for i in range(first, min(n, first + batch))])
        params = torch.stack(params)
        for v, size in enumerate(views.sizes):  # in chunks of the pipeline's size
            chunk = common.rows_per_chunk(size, len(images), torch.device("cpu"))
            for a in range(0, len(images), chunk):
                common.cut_crops(images[a : a + chunk], params[a : a + chunk, v], params[a : a + chunk, v], size)
    return n / (time.perf_counter() - start)


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


def timed(stage, seconds, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[stage] += time.perf_counter() - start

    return wrapper


def stage_breakdown(views, dataset, n, batch):
    """The full pipeline once more, each stage function of common.py wrapped in a timer: milliseconds per image
    by stage; `collate` is what remains (sorting rows, gathering images, the views' final order)."""
    seconds = collections.defaultdict(float)
    originals = {name: getattr(common, name) for name in STAGES if name not in COLOR_OPS and name != "draw"}
    color_op, draw = common.color_op, common.Views.draw
    try:
        for name, fn in originals.items():
            setattr(common, name, timed(name, seconds, fn))
        common.color_op = lambda x, factor, which, **bound: timed(COLOR_OPS[which], seconds, color_op)(
            x, factor, which, **bound
        )
        common.Views.draw = timed("draw", seconds, draw)
        total = n / time_ours(views, dataset, n, batch)
    finally:
        for name, fn in originals.items():
            setattr(common, name, fn)
        common.color_op, common.Views.draw = color_op, draw
    stages = {name: seconds[name] for name in STAGES}
    stages["collate"] = total - sum(stages.values())
    return {name: round(1e3 * s / n, 3) for name, s in stages.items()}


def bench_recipe(recipe, size, args, images):
    """One recipe's row: the ceilings, the pipeline, lightly and the stage breakdown on the ImageFiles `images`."""
    name, views = our_recipe(recipe, size, args.local_crops)
    dataset = copy.copy(images)
    dataset.draft_side = max(views.sizes)  # as train_loader decodes for these views
    n = len(dataset)
    lightly = lightly_transform(recipe, size, views.sizes[2:]) if args.vs == "lightly" else None
    sides = {"decode": time_decode, "decode_crops": time_crops, "ours": time_ours}
    best = dict.fromkeys([*sides, *(["lightly"] if lightly else [])], 0.0)
    for _ in range(args.rounds):
        for side, fn in sides.items():
            best[side] = max(best[side], fn(views, dataset, n, args.batch))
        if lightly is not None:
            best["lightly"] = max(best["lightly"], time_lightly(lightly, dataset, n, args.batch))
    row = {"recipe": recipe, "aug": name, "img_size": size, "views": views.sizes}
    row.update({f"{side}_img_per_s": round(v, 1) for side, v in best.items()})
    row.update(share_of_decode=round(best["ours"] / best["decode"], 2))
    row.update(share_of_decode_crops=round(best["ours"] / best["decode_crops"], 2))
    if lightly is not None:
        row.update(ratio=round(best["ours"] / best["lightly"], 2))
    row["ms_per_image_by_stage"] = stage_breakdown(views, dataset, n, args.batch)
    return row


def print_row(row):
    against = f", lightly {row['lightly_img_per_s']} ({row['ratio']}x)" if "ratio" in row else ""
    print(f"{row['recipe']} {row['img_size']} px {row['views']}: ours {row['ours_img_per_s']} img/s{against}; "
          f"decode {row['decode_img_per_s']}, + crops {row['decode_crops_img_per_s']} (ours is "
          f"{row['share_of_decode']:.0%} and {row['share_of_decode_crops']:.0%} of them)")  # fmt: skip
    stages = row["ms_per_image_by_stage"]
    total = sum(stages.values())
    print("  ms/image: " + ", ".join(f"{k} {v:.3f} ({v / total:.0%})" for k, v in stages.items() if v >= 0.0005))


def bench_pipeline(args):
    if not args.data:
        raise common.UserError("--data is required for the pipeline benchmark (a folder of images)")
    torch.set_num_threads(1)  # one core: what one loader worker gets
    cases = ALL_RECIPES if args.recipe == "all" else [(args.recipe, args.img_size)]
    for recipe, _ in cases:
        if recipe not in METHODS:
            raise common.UserError(f"unknown --recipe {recipe!r}; choose all or one of {', '.join(METHODS)}")
    images = common.ImageFiles(args.data)
    count = args.make_jpegs or args.n
    images.samples = images.samples[:: max(1, len(images) // count)][:count]  # spread over the classes
    if args.make_jpegs:  # e.g. ImageNet-style 224 px JPEGs made from CIFAR images, when no such set is at hand
        images = common.ImageFiles(make_jpegs(images.samples, args.side))
    images.samples = images.samples[: args.n]
    report = {"machine": machine(), "cores": 1, "torch": torch.__version__, "images": len(images)}
    report.update(source=args.data, jpegs=f"{args.side}x{args.side} q90" if args.make_jpegs else None, recipes=[])
    for recipe, size in cases:
        row = bench_recipe(recipe, size, args, images)
        print_row(row)
        report["recipes"].append(row)
    return report


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
