"""Plumbing shared by the method scripts, in the order data flows through a run: the command line and its errors,
processes and devices, data sets and loaders, augmentations, backbones, optimisation (LARS, schedules, EMA, FLOP
counting), checkpoints and logs, evaluation (the k-NN monitor). Nothing here knows which method is training."""

import argparse
import atexit
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import sys
import time
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------
# Command line and errors: the flags' shared checks, and user errors as one line with exit code 2.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": 32, "imagenet": 224, "folder": 224}
# the output width of a ResNet; (width, depth, heads) of a ViT
ARCHS = {"resnet18": 512, "resnet50": 2048, "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}
ARCHS["vit_base"] = (768, 12, 12)
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
STEM_CHOICES = ("auto", "cifar", "imagenet")
OPTIMIZERS = ("lars", "sgd", "adamw")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written and every flag's default."""


class UserError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


def run(main):
    """Run a script's main(); user errors end it with one line and exit code 2, a stop signal's checkpoint with one
    line and EXIT_PREEMPTED."""
    try:
        main()
        if dist.is_available() and dist.is_initialized():  # a clean end under torchrun (NCCL warns without it)
            dist.destroy_process_group()
    except UserError as e:
        # Raised in a DataLoader worker, it arrives wrapped in the worker's traceback text: keep the message.
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1] if "Original Traceback" in str(e) else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        if rank() == 0:
            print(e, file=sys.stderr)
        if dist.is_available() and dist.is_initialized():  # every process stopped after the same step
            dist.destroy_process_group()
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        restore_signal_handlers()


class Checked:
    """An argparse type: `kind` parsed from the text, then `test`ed; otherwise argparse's usage and `error:` lines
    name the flag, the value and what it must be."""

    def __init__(self, kind, test, must_be):
        self.kind, self.test, self.must_be = kind, test, must_be
        self.__name__ = kind.__name__

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.test(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {self.must_be}")
        return value


def mlp_widths(allow_embed):
    """Head widths written as 2048-2048-128: positive integers joined by '-' ('embed': the encoder's width)."""
    words = ("embed",) if allow_embed else ()
    example = "embed-128 or 2048-128" if allow_embed else "2048-128"
    return Checked(str, lambda text: all(w.isdigit() and int(w) > 0 or w in words for w in text.split("-")), example)


POSITIVE_INT = Checked(int, lambda v: v > 0, "an integer >= 1")
COUNT = Checked(int, lambda v: 0 <= v, "an integer >= 0")
SEED = Checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
POSITIVE = Checked(float, lambda v: 0 < v < math.inf, "a number > 0")
NON_NEGATIVE = Checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
FRACTION = Checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
BELOW_ONE = Checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
# The valid values of every numeric flag of the scripts; a test checks that none is missing.
RANGE_FLAGS = {
    POSITIVE_INT: "img_size patch_size log_every epochs batch out_dim decoder_dim decoder_depth n_last_blocks",
    COUNT: "workers subset knn_every ckpt_every negatives local_crops warmup_teacher_temp_epochs freeze_last_layer",
    SEED: "seed",
    POSITIVE: "width lr lars_eta temperature student_temp teacher_temp warmup_teacher_temp",
    NON_NEGATIVE: "wd wd_end warmup_epochs budget_flops sim_coeff std_coeff cov_coeff clip_grad",
    FRACTION: "ema center_momentum",
    BELOW_ONE: "mask_ratio drop_path",
}
FLAG_RANGES = {dest: checked for checked, dests in RANGE_FLAGS.items() for dest in dests.split()}  # by destination
SWITCHES = ("lars_clip", "zero_init_residual", "norm_last_layer", "bn_in_head", "norm_pix")  # 0 or 1


def flag_choices():
    """The allowed values of the enumerated flags, by destination."""
    choices = {"dataset": list(NATIVE_SIZE), "arch": list(ARCHS), "amp": AMP_CHOICES, "stem": STEM_CHOICES}
    choices.update(optimizer=OPTIMIZERS, aug=list(RECIPES), **{name: (0, 1) for name in SWITCHES})
    return choices


def with_checks(parser):
    """The parser with every flag checked as it is parsed: enumerated flags get `choices` (where the script did not
    narrow them itself), numeric flags their FLAG_RANGES type, --mlp its format. Bad values end in argparse's usage
    and `error:` lines, exit code 2, before anything is read or written."""
    choices = flag_choices()
    for action in parser._actions:
        if action.dest in choices and action.choices is None:
            action.choices = choices[action.dest]
        if action.dest in FLAG_RANGES:
            action.type = FLAG_RANGES[action.dest]
        if action.dest == "mlp":
            action.type = mlp_widths(allow_embed="embed" in (action.default or ""))
    return parser


def parse_args(parser, argv=None):
    """A training script's arguments: each flag checked (with_checks), then the combinations (check_args and the
    training run's own), so that a run that cannot work stops before it reads or writes anything."""
    args = check_args(with_checks(parser).parse_args(argv))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch % processes:
        raise UserError(
            f"--batch {args.batch} is not divisible by the {processes} processes; pick a multiple of {processes}"
        )
    if getattr(args, "negatives", 0) > 2 * args.batch - 2:
        raise UserError(
            f"--negatives {args.negatives} exceeds the {2 * args.batch - 2} other views of a --batch {args.batch}"
        )
    if hasattr(args, "mask_ratio") and int((args.img_size // args.patch_size) ** 2 * (1 - args.mask_ratio)) < 1:
        raise UserError(f"--mask-ratio {args.mask_ratio} keeps no patch of {args.img_size} px in {args.patch_size} px")
    if getattr(args, "decoder_dim", 16) % 16:
        raise UserError(f"--decoder-dim {args.decoder_dim} must be a multiple of the decoder's 16 attention heads")
    return args


def check_args(args):
    """Refuse unknown --dataset/--arch/--amp/--stem (eval_linear.py fills them from a run's args.json, past argparse)
    and widths or patches that cannot work. Returns a copy of args with --img-size (the data set's native size) and
    --patch-size (16 from 160 px, 8 above 64, else 4) filled in."""
    choices = flag_choices()
    for name in ("dataset", "arch", "amp", "stem"):
        if getattr(args, name) not in choices[name]:
            raise UserError(f"unknown --{name} {getattr(args, name)!r}; choose from {', '.join(choices[name])}")
    img_size = args.img_size or NATIVE_SIZE[args.dataset]
    if args.patch_size:
        patch_size = args.patch_size
    elif img_size >= 160:
        patch_size = 16
    else:
        patch_size = 8 if img_size > 64 else 4
    vit = args.arch.startswith("vit")
    if vit and args.width != 1:
        raise UserError(f"--width {args.width} must be 1 for a ViT (it scales ResNets)")
    if vit and img_size % patch_size:
        raise UserError(f"--img-size {img_size} is not a multiple of --patch-size {patch_size}")
    return argparse.Namespace(**{**vars(args), "img_size": img_size, "patch_size": patch_size})


# ----------------------------------------------------------------------------------------------------------
# Processes and devices: torchrun's process group, the device, seeds, the gather that keeps gradients, DDP and
# torch.compile, AMP, and moving a batch onto the device.


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss sends gradient to every rank's slice: sum them, then keep our own slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def gather(x):
    """All-gather along dim 0 that keeps gradients (identity when not distributed)."""
    return _Gather.apply(x) if world_size() > 1 else x


@dataclasses.dataclass(frozen=True)
class Env:
    """Where this process runs: its device, the number of processes, and its rank (rank 0 writes the files)."""

    device: torch.device
    world: int = 1
    rank: int = 0

    @property
    def main(self):
        return self.rank == 0


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init(args, out_dir=None):
    """Start this process: join torchrun's process group (NCCL on CUDA, gloo on CPU), pick the device, turn on
    TF32 and cuDNN autotuning, seed every RNG with --seed + rank, and create out_dir when given (rank 0)."""
    cuda = torch.cuda.is_available()
    # Under torchrun (which sets TORCHELASTIC_RUN_ID) even one process joins the group: DDP and SyncBatchNorm
    # then run at any process count.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    env = Env(device, world_size(), rank())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    seed_everything(args.seed + env.rank)
    if out_dir is not None and env.main:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {out_dir!r} ({e.strerror}); choose a writable folder")
        if not os.access(out_dir, os.W_OK):
            raise UserError(f"--out {out_dir!r} is not writable; choose a writable folder")
    if env.main:
        print(f"{env.world} process(es) on {env.device}, {precision(args, device)}")
        if getattr(args, "gpu_aug", False) and not cuda:
            print("--gpu-aug without a GPU: the crops, colour and blur run in the training process, on the CPU")
    return env


def distribute(net, args, env):
    """channels_last for ResNets, DDP under torchrun (with SyncBatchNorm on CUDA), torch.compile on request."""
    if args.arch.startswith("resnet"):
        net = net.to(memory_format=torch.channels_last)
    model = net
    if dist.is_initialized():
        if env.device.type == "cuda":  # SyncBatchNorm has no CPU kernel; on CPU each process normalises its own batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if args.compile else model


def native_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as torch reports it (older torch: no)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(args, device):
    """--amp as an autocast dtype, None for fp32. auto: bf16 on CUDA and on a CPU with native bf16 (1.5-2.5x faster
    there), fp32 on other CPUs (where bf16 is emulated and about 100x slower)."""
    if args.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)


def precision(args, device):
    """The first line's words for the precision a run computes in."""
    dtype = amp_dtype(args, device)
    chosen = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "fp32"}[dtype]
    if args.amp != "auto" or device.type == "cuda":
        return chosen
    return f"{chosen} (--amp auto: {'native' if dtype else 'no native'} bf16 on this CPU)"


def autocast(args, env):
    """AMP written once: returns (context factory, GradScaler), for amp_dtype's choice."""
    dtype = amp_dtype(args, env.device)
    amp = functools.partial(torch.autocast, env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    return amp, torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)


def normalize_batch(x):
    """Images in 0-255 (uint8, or floats) -> float32 with the ImageNet mean and std."""
    mean, std = x.new_tensor(IMAGENET_MEAN, dtype=torch.float32), x.new_tensor(IMAGENET_STD, dtype=torch.float32)
    return (x.float() - mean.view(1, 3, 1, 1) * 255) / (std.view(1, 3, 1, 1) * 255)


def to_device(views, args, env):
    """A batch's views on the device as normalised float32 (uint8 views are normalised there; float views, already
    normalised, pass through), channels_last for ResNets."""
    fmt = torch.channels_last if args.arch.startswith("resnet") else torch.contiguous_format
    views = [v.to(env.device, non_blocking=True) for v in views]
    return [(normalize_batch(v) if v.dtype == torch.uint8 else v).contiguous(memory_format=fmt) for v in views]


# ----------------------------------------------------------------------------------------------------------
# Data: the data sets (uint8 (3, H, W) images and int labels, -1 when unknown), the seeded per-item augmentation
# wrapper, the epoch sampler and the training loader.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class SyntheticTextures(Dataset):
    """Ten classes of textures that fill the image: horizontal and vertical stripes, checkerboard, rings, dots,
    grid, diagonal hatching, spokes, wavy stripes, blobs. Colours, period, phase, centre and noise are random, and
    every class looks like itself after a flip or a crop, so the label survives augmentation while colour (which
    dominates a random network's features) carries none. Image i is a pure function of (seed, i): no files."""

    labelled, num_classes = True, 10

    def __init__(self, n, size, seed):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < len(self):  # iterating the data set ends (an IndexError), as with a list
            raise IndexError(f"image {i} of {len(self)}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label, s = i % 10, self.size
        bg, fg = torch.rand(3, generator=g), torch.rand(3, generator=g)
        fg = torch.where((fg - bg).abs() < 0.25, (bg + 0.5) % 1.0, fg)  # keep the texture visible
        period, phase, cx, cy = (torch.rand(4, generator=g) * torch.tensor([5.0, 6.28, s, s])).tolist()
        yy, xx = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        w = 2 * math.pi / ((4 + period) * s / 32)  # a period of 4 to 9 pixels at 32 px
        u, v, r = xx * w + phase, yy * w + phase, ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() * w + phase
        if label == 9:  # blobs: smooth noise, thresholded
            low = torch.rand(1, 1, 5, 5, generator=g)
            blobs = F.interpolate(low, size=(s, s), mode="bicubic", align_corners=False)[0, 0]
        masks = [
            lambda: torch.sin(v) > 0,
            lambda: torch.sin(u) > 0,
            lambda: torch.sin(u) * torch.sin(v) > 0,
            lambda: torch.sin(r) > 0,
            lambda: torch.cos(u) + torch.cos(v) > 1.0,
            lambda: (torch.cos(u) > 0.8) | (torch.cos(v) > 0.8),
            lambda: (torch.cos((u + v) / 1.4) > 0.8) | (torch.cos((u - v) / 1.4) > 0.8),
            lambda: torch.sin(6 * torch.atan2(yy - cy, xx - cx) + phase) > 0,
            lambda: torch.sin(v + 1.5 * torch.sin(u)) > 0,
            lambda: blobs > 0.5,
        ]
        mask = masks[label]().float()
        noise = 0.06 * torch.randn(3, s, s, generator=g)
        img = bg[:, None, None] + mask * (fg - bg)[:, None, None] + noise
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), label


class ArrayImages(Dataset):
    """uint8 images held in memory (torchvision's CIFAR/STL arrays), returned as (3, H, W) uint8 tensors.
    labelled=False for a split whose labels are not all known (STL-10's train+unlabeled)."""

    def __init__(self, data, labels, channels_last, labelled=True):
        self.data, self.labels, self.channels_last, self.labelled = data, labels, channels_last, labelled
        self.num_classes = int(np.max(labels)) + 1

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = torch.from_numpy(np.ascontiguousarray(self.data[i]))
        return (img.permute(2, 0, 1) if self.channels_last else img), int(self.labels[i])


class ImageFiles(Dataset):
    """Images under a folder: class sub-folders give labels (sorted names), plain images get label -1.
    draft_side > 0: a JPEG at least twice that side (both ways) is decoded at 1/2, 1/4 or 1/8 scale (PIL draft
    mode), never below it. Crop boxes are drawn as fractions of whatever size arrives, so the crop distribution is
    unchanged; only the resampling differs, and no crop of the whole image is ever upsampled more."""

    def __init__(self, root, classes=None, draft_side=0):
        self.root, self.draft_side = root, draft_side
        found = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.classes = classes if classes is not None else found
        self.labelled, self.num_classes = bool(self.classes), len(self.classes)
        self.samples = [
            (os.path.join(root, f), -1) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                self.samples += [
                    (os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
                ]
        if not self.samples:
            raise UserError(f"no images found under {root}; expected class folders of images or images directly")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            return decode_image(path, self.draft_side), label
        except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as e:  # bad files
            raise UserError(f"cannot read image {path} ({e}); remove or replace it") from None


def decode_image(path, draft_side=0):
    """An image file as a (3, H, W) uint8 tensor (grayscale, palette and RGBA become RGB). A JPEG decoded at full
    size goes through torchvision.io.decode_jpeg (the same libjpeg-turbo pixels as PIL, about 1.5x as fast;
    deprecated since torchvision 0.29, so PIL takes over where it is gone); one reduced by draft mode (see
    ImageFiles) through PIL."""
    from PIL import Image

    with Image.open(path) as im:
        full_size = im.size
        if draft_side:
            im.draft("RGB", (draft_side, draft_side))
        full_size_jpeg = im.format == "JPEG" and im.size == full_size and im.mode in ("RGB", "L")
        if full_size_jpeg and hasattr(torchvision.io, "decode_jpeg"):
            return torchvision.io.decode_jpeg(torchvision.io.read_file(path), torchvision.io.ImageReadMode.RGB)
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def random_subset(ds, n, seed):
    """A fixed random subset of n items, drawn from `seed`."""
    if n > len(ds):
        raise UserError(f"--subset {n} is larger than the {len(ds)} training images")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.Subset(ds, order[:n].tolist())


def torchvision_dataset(name, root, split):
    train = split != "test"
    try:
        for download in (False, True):
            try:
                if name == "stl10":
                    stl_split = {"train": "train+unlabeled", "memory": "train", "test": "test"}[split]
                    ds = torchvision.datasets.STL10(root, split=stl_split, download=download)
                    return ArrayImages(ds.data, ds.labels, channels_last=False, labelled=split != "train")
                cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
                ds = cls(root, train=train, download=download)
                return ArrayImages(ds.data, ds.targets, channels_last=True)
            except RuntimeError:
                if download:
                    raise
    except (OSError, RuntimeError, ValueError) as e:  # missing files, no network, a failed checksum
        raise UserError(
            f"cannot find or download {name} under {root!r} ({str(e).splitlines()[0]}); put torchvision's files there "
            f"(--data), or use --dataset folder with an ImageFolder copy, or --dataset synthetic"
        ) from None


def build_dataset(args, split, draft_side=0):
    """The raw dataset for split train|test|memory ('memory': the labelled training data, the k-NN memory bank);
    None for a test split that does not exist. draft_side: see ImageFiles."""
    name, root = args.dataset, args.data
    if name == "synthetic":
        test = split == "test"  # the test images come from another seed
        ds = SyntheticTextures(1000 if test else 4000, args.img_size, args.seed + (7919 if test else 0))
    elif name in ("imagenet", "folder"):
        if not root or not os.path.isdir(root):
            raise UserError(f"--data {root!r} is not a folder; give the root holding train/ (and val/ or test/)")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise UserError(f"{root} has no train/ folder; expected {root}/train/ (and {root}/val/ or {root}/test/)")
        ds = ImageFiles(train_dir, draft_side=draft_side)
        if split == "test":
            test_dir = next((d for d in (f"{root}/val", f"{root}/test") if os.path.isdir(d)), None)
            ds = ImageFiles(test_dir, classes=ds.classes) if test_dir and ds.classes else None
    else:
        ds = torchvision_dataset(name, root or "data", split)
    if ds is not None and split == "train" and args.subset:
        ds = random_subset(ds, args.subset, args.seed)
    return ds


class Augmented(Dataset):
    """Applies a transform to a raw dataset. With a seed the transform is random, called as transform(img,
    generator), and keys may be (epoch, index): the generator is then seeded from (seed, epoch, index), so data
    do not depend on worker count and a resumed run sees exactly the crops an uninterrupted one would (a generator
    of its own, not the global RNG: forking the global RNG costs 0.1 ms an item)."""

    def __init__(self, base, transform, seed=None):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        threads = torch.get_num_threads()
        # One image's tensors are tiny: in the main process (--workers 0) a thread pool costs 5-15x the work itself
        # (loader workers already run on one thread).
        torch.set_num_threads(1)
        try:
            img, label = self.base[i]
            if self.seed is None:
                return self.transform(img), label
            item_seed = ((self.seed * 1_000_003 + epoch) * 1_000_000_007 + i) % 2**64
            return self.transform(img, torch.Generator().manual_seed(item_seed)), label
        finally:
            torch.set_num_threads(threads)


class EpochSampler(Sampler):
    """Shuffled indices for this process, reshuffled by (seed, epoch); yields (epoch, index) keys. An epoch resumed
    from a checkpoint written within it skips the batches it already trained, without drawing them."""

    def __init__(self, n, seed, local_batch):
        self.n, self.seed, self.local_batch, self.epoch, self.skip = n, seed, local_batch, 0, 0
        self.per_rank = n // (world_size() * local_batch) * local_batch  # full batches only, equal on every rank

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches * self.local_batch

    def __len__(self):
        return self.per_rank - self.skip

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        start = rank() * self.per_rank
        return iter([(self.epoch, i) for i in order[start + self.skip : start + self.per_rank]])


def per_process_batch(args, env):
    """This process's share of the global --batch (parse_args refused a batch that does not split evenly)."""
    return args.batch // env.world


def train_loader(args, env, views):
    """Batches of (views, labels) for this process (--batch / processes images each): uint8 views rendered in the
    workers, or with --gpu-aug RawViews that Views.render_on_device renders on the training device."""
    local_batch = per_process_batch(args, env)
    images = build_dataset(args, "train", draft_side=max(views.sizes))
    dataset = Augmented(images, views.draw, args.seed)
    sampler = EpochSampler(len(dataset), args.seed, local_batch)
    if len(sampler) == 0:
        raise UserError(f"{len(dataset)} training images do not make one batch of {args.batch}; lower --batch")
    workers = {
        "num_workers": args.workers,
        "persistent_workers": args.workers > 0,
        "pin_memory": env.device.type == "cuda",
        "worker_init_fn": loader_worker_init,
    }
    own = torch.Generator().manual_seed(args.seed)  # worker seeds must not draw from the global RNG
    collate = views.collate_raw if args.gpu_aug else views.collate
    return DataLoader(
        dataset, local_batch, sampler=sampler, drop_last=True, generator=own, collate_fn=collate, **workers
    )


# ----------------------------------------------------------------------------------------------------------
# Augmentations. A recipe is one ViewSpec per view. Each image's parameters (crop box, flip, jitter factors
# and order, grayscale, blur sigma, solarize) are drawn in the dataset's __getitem__, a pure function of the
# item's seed; the pixel work then runs batched over the whole batch (Views.render): in the loader workers on
# CPU tensors, or with --gpu-aug on the training device. The image is decoded once and every crop is cut from
# it; pixels cross processes and the host-device link as uint8 and are normalised in to_device.

# One view's parameters are a float row with these columns (COL.<name> is each one's index).
FIELDS = ("top", "left", "height", "width", "flip", "jitter", "brightness", "contrast", "saturation", "hue")
FIELDS += ("order0", "order1", "order2", "order3", "gray", "blur", "sigma", "solarize", "noise", "seed")
COL = SimpleNamespace(**{name: i for i, name in enumerate(FIELDS)})
COL.order = slice(COL.order0, COL.order3 + 1)  # ColorJitter's random order of the four ops
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

# The uniforms one view's draw consumes, by name: 22 for the crop (ten tries of an area and an aspect, then the
# position), then one per decision. One draw of all 36 keeps a loader worker's per-item work cheap. A noise view
# draws no crop: it takes its noise seed from the first uniform.
UNIFORMS = {"crop": slice(0, 22), "noise_seed": 0, "flip": 22, "jitter": 23, "gray": 24, "blur": 25}
UNIFORMS.update({"order": slice(26, 30), "factors": slice(30, 33), "hue": 33, "sigma": 34, "solarize": 35})
UNIFORMS_PER_VIEW = 36


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """One view of a recipe: random resized crop (area `scale`, aspect `ratio`), flip, colour jitter (brightness,
    contrast, saturation, hue in a random order, with probability jitter_p), grayscale, Gaussian blur (sigma
    0.1-2, kernel 10% of the side), solarize; `noise` > 0: the whole image plus Gaussian pixel noise instead."""

    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    flip_p: float = 0.5
    noise: float = 0.0


def crop_box(h, w, scale, ratio, u):
    """torchvision's RandomResizedCrop.get_params on 22 uniforms u: (top, left, height, width). Ten tries of an
    area fraction uniform in `scale` and a log-uniform aspect in `ratio`; the first that fits is placed uniformly,
    else the largest centred crop of an allowed aspect."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        area = h * w * (scale[0] + u[2 * t] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[2 * t + 1] * (log_hi - log_lo))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[20] * (h - ch + 1)), int(u[21] * (w - cw + 1)), ch, cw
    if w / h < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif w / h > max(ratio):
        ch, cw = h, round(h * max(ratio))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def draw_params(spec, h, w, generator=None):
    """One view's parameters for an (h, w) image, a float row in FIELDS order, from `generator` (default: the
    global torch RNG)."""
    draws = torch.rand(UNIFORMS_PER_VIEW, dtype=torch.float64, generator=generator).tolist()
    u = {name: draws[where] for name, where in UNIFORMS.items()}
    row = dict.fromkeys(FIELDS, 0.0)
    if spec.noise:  # the whole image resized (shorter side) and centre-cropped: its central square
        side = min(h, w)
        row.update(top=(h - side) // 2, left=(w - side) // 2, height=side, width=side)
        row.update(noise=spec.noise, seed=int(u["noise_seed"] * 2**24))
    else:
        row.update(zip(("top", "left", "height", "width"), crop_box(h, w, spec.scale, spec.ratio, u["crop"])))
        row.update(flip=u["flip"] < spec.flip_p, jitter=u["jitter"] < spec.jitter_p)
        b, c, s, hue = spec.jitter
        factors = [1 + x * (2 * v - 1) for x, v in zip((b, c, s), u["factors"])]  # uniform in [1 - x, 1 + x]
        row.update(zip(("brightness", "contrast", "saturation"), factors))
        row.update(hue=hue * (2 * u["hue"] - 1))
        row.update(zip(("order0", "order1", "order2", "order3"), sorted(range(4), key=lambda i: u["order"][i])))
        row.update(gray=u["gray"] < spec.gray_p, blur=u["blur"] < spec.blur_p, sigma=0.1 + 1.9 * u["sigma"])
        row.update(solarize=u["solarize"] < spec.solarize_p)
    return torch.tensor([float(row[name]) for name in FIELDS], dtype=torch.float32)


BLUR_TAPS_MAX = 13  # +-3 sigma at the largest sigma (2): wider kernels only add weights below 0.3% of the mass


def blur_kernel(size):
    return max(3, int(0.1 * size) // 2 * 2 + 1)  # about 10% of the side, odd (23 taps at 224 px)


def grayscale(x):
    """torchvision's rgb_to_grayscale of (n, 3, H, W) images: one weighted sum over the channels."""
    r, g, b = x.unbind(1)
    return torch.mul(r, GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])[:, None]


def adjust_hue(x, shift):
    """Rotate the HSV hue of (n, 3, H, W) images (on any scale: 0-1 or 0-255) by shift (n,) turns, keeping value and
    saturation, in place: torchvision's adjust_hue in a closed form with few passes over the pixels. Channel c of
    a pixel with maximum V, minimum m, chroma C = V - m and new hue H (turns) is m + C clamp(|6u - 3| - 1, 0, 1),
    u = frac(H + (n_c + 1) / 6), n = 5, 3, 1 for red, green, blue (torchvision's V - C clamp(min(k, 4 - k), 0, 1),
    k = (n + 6H) mod 6, written with one modulo and one absolute value). No torch.where on the full image: on a
    CPU it costs about ten multiplications."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = v - low
    inv = chroma.clamp_min(1e-12).reciprocal_()  # grey pixels (chroma 0): any hue works, and (g - b) is 0
    # torchvision's sextants: red is the maximum: (g - b) / C; else green: 2 + (b - r) / C; else 4 + (r - g) / C
    red = torch.eq(v, r, out=torch.empty_like(v))  # as floats: 3x faster than a bool mask converted after
    not_red = 1 - red
    green = torch.eq(v, g, out=torch.empty_like(v)).mul_(not_red)
    blue = not_red.sub_(green)
    h6 = (g - b).mul_(red)
    h6.add_((b - r).add_(chroma, alpha=2).mul_(green))
    h6.add_((r - g).add_(chroma, alpha=4).mul_(blue))
    # the new hue in turns, plus one: positive, so frac below is the modulo
    turns = h6.mul_(inv).add_(6 * shift.view(-1, 1, 1) + 6).mul_(1 / 6)
    u = torch.add(x.new_tensor([1, 4 / 6, 2 / 6]).view(1, 3, 1, 1), turns[:, None], out=x).frac_()
    # m + C clamp(|6u - 3| - 1, 0, 1) = (m - C) + 6 C clamp(|u - 1/2|, 1/6, 1/3)
    u = u.sub_(0.5).abs_().clamp_(1 / 6, 1 / 3)
    base = low.sub_(chroma)  # m - C
    return torch.addcmul(base[:, None], chroma[:, None], u, value=6, out=u)


def color_op(x, factor, which, bound=1.0):
    """Brightness (0), contrast (1), saturation (2) or hue (3) of (n, 3, H, W) images in [0, bound], one factor per
    image, in place (x is returned)."""
    if which == 3:
        return adjust_hue(x, factor)
    f = factor.view(-1, 1, 1, 1)
    if which == 0:
        return x.mul_(f).clamp_max_(bound)  # factors are >= 0
    if which == 1:  # towards the mean grey (a lerp_ towards one value per image measured 2x slower)
        mean_grey = grayscale(x).mean((1, 2, 3), keepdim=True)
        return x.mul_(f).add_(mean_grey.mul_(1 - f)).clamp_(0, bound)
    return x.lerp_(grayscale(x), 1 - f).clamp_(0, bound)  # f x + (1 - f) grey in one pass


def gaussian_blur(x, sigma, taps):
    """Separable Gaussian blur of (n, 3, H, W) with a sigma per image, reflect padding (torchvision's kernel)."""
    n, c, h, w = x.shape
    t = torch.arange(taps, device=x.device, dtype=x.dtype) - (taps - 1) / 2
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = torch.where(kernel > 1e-20, kernel, 0)  # denormal weights (sigma near 0.4) make the conv 3-5x slower
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n c, taps)
    y = F.pad(x.reshape(1, n * c, h, w), (taps // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, taps, 1), groups=n * c)
    return F.conv2d(y, kernel.view(n * c, 1, 1, taps), groups=n * c).view(n, c, h, w)


def where_rows(mask, fn, x, *row_args):
    """Apply fn to the images where mask (on the CPU: no device sync) is set, leaving the others unchanged. Rows
    that form one contiguous run (the blurred ones: see render_order) are worked on as a slice, without a gather
    and a scatter."""
    idx = mask.nonzero()[:, 0]
    if not len(idx):
        return x
    if idx[-1] - idx[0] + 1 == len(idx):
        rows = slice(int(idx[0]), int(idx[-1]) + 1)
        x[rows] = fn(x[rows], *[a[rows] for a in row_args])
    else:
        idx = idx.to(x.device, non_blocking=True)
        x.index_copy_(0, idx, fn(x.index_select(0, idx), *[a.index_select(0, idx) for a in row_args]))
    return x


def jitter_key(rows):
    """Each row's colour-jitter order as one number (ColorJitter draws one of 24 per image; unjittered rows: 0)."""
    return torch.where(rows[:, COL.jitter].bool(), 1 + rows[:, COL.order].long() @ torch.tensor([64, 16, 4, 1]), 0)


def render_order(rows):
    """The order in which a size group's rows are rendered: the blurred rows last, each part sorted by jitter_key,
    so that the blur works on one contiguous run of rows per chunk and each colour op on runs of one order."""
    return (rows[:, COL.blur].long() * 257 + jitter_key(rows)).argsort(stable=True)  # jitter_key is at most 229


def jitter_runs(host_p):
    """The runs of rows sharing a jitter order in rows in render_order: [(start, end, order)], so that each op runs
    on a contiguous slice."""
    values, counts = torch.unique_consecutive(jitter_key(host_p), return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [
        (e - n, e, [k // 4**i % 4 for i in (3, 2, 1, 0)])
        for k, n, e in zip((values - 1).tolist(), counts.tolist(), ends)
        if k >= 0
    ]


def flip(crops, host_p):
    return where_rows(host_p[:, COL.flip].bool(), lambda y: y.flip(-1), crops)


JITTER_BLOCK = 2**18  # values: a block of rows this size stays in a core's L2 cache through all four ops


def color_jitter(x, p, host_p):
    """ColorJitter's four ops in each row's order, block by block: on a cache-resident block hue runs 1.5x as fast
    as on a whole chunk."""
    block = max(1, JITTER_BLOCK // x[0].numel()) if x.device.type == "cpu" else len(x)  # a GPU takes it all at once
    for start, end, order in jitter_runs(host_p):
        for first in range(start, end, block):
            rows = slice(first, min(first + block, end))
            for which in order:
                color_op(x[rows], p[rows, COL.brightness + which], which, bound=255)
    return x


def random_grayscale(x, host_p):
    return where_rows(host_p[:, COL.gray].bool(), lambda y: grayscale(y).expand(-1, 3, -1, -1), x)


def random_blur(x, p, host_p, taps):
    return where_rows(host_p[:, COL.blur].bool(), functools.partial(gaussian_blur, taps=taps), x, p[:, COL.sigma])


def random_solarize(x, host_p):
    return where_rows(host_p[:, COL.solarize].bool(), lambda y: torch.where(y >= 128, 255 - y, y), x)


def to_uint8(x):
    return x.round_().to(torch.uint8)


def render(crops, p, host_p, taps):
    """Jitter, grayscale, blur and solarize (n, 3, S, S) float crops in 0-255 with parameter rows p (n, F) on their
    device, in render_order; host_p: the same rows on the CPU, for the masks. In place where it can be."""
    x = color_jitter(crops, p, host_p)
    x = random_grayscale(x, host_p)
    x = random_blur(x, p, host_p, taps)
    return random_solarize(x, host_p)


def cut_crops(images, p, host_p, size):
    """Crop boxes (the rows' first four columns) out of uint8 images, resize them to size x size and flip them
    where host_p says, as floats in 0-255 (the pixel work keeps uint8's scale, which saves a pass at each end). On
    the CPU, images is a list of (3, H, W) uint8 tensors, each crop goes through F.interpolate's uint8 path, bicubic
    as the official code of all five methods and antialiased as the PIL-based ones (VICReg, DINO, MAE; at most 2.6%
    slower than bilinear, measured in docs/speed.md), and is flipped as uint8 and converted as it is written into
    the batch: no separate float pass, and no gather and scatter of uint8 rows (index_copy_ on uint8 measured 12x
    slower than a copy).
    With --gpu-aug, images is a uint8 (N, 3, H, W) canvas holding them at the top left, cut through roi_align
    (bilinear: it averages ceil(box/size)^2 bilinear samples per pixel) and flipped after."""
    if torch.is_tensor(images):
        top, left, h, w = p[:, :4].unbind(1)
        rois = torch.stack([torch.arange(len(p), device=p.device, dtype=p.dtype), left, top, left + w, top + h], 1)
        return flip(torchvision.ops.roi_align(images.float(), rois, size, aligned=True), host_p)
    crops = torch.empty(len(images), 3, size, size)
    boxes = host_p[:, :4].int().tolist()
    flips = host_p[:, COL.flip].bool().tolist()
    for out, img, (top, left, h, w), flipped in zip(crops, images, boxes, flips):
        crop = img[None, :, top : top + h, left : left + w]
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        out.copy_(crop.flip(-1) if flipped else crop)
    return crops


def rows_per_chunk(size, n, device):
    """How many of n rows of one view size are rendered together: about 4 MB of float pixels on a CPU (measured
    faster than 1 or 2 MB), all of them on a GPU."""
    return max(1, 2**20 // (3 * size * size)) if device.type == "cpu" else n


def pixel_noise(rows, like):
    """Gaussian noise for the views with a noise level, each from its own seed (so it is the same on any device)."""
    noise = torch.zeros(like.shape)
    for j in rows[:, COL.noise].nonzero()[:, 0].tolist():
        noise[j] = torch.randn(like.shape[1:], generator=torch.Generator().manual_seed(int(rows[j, COL.seed])))
    return noise.to(like.device)


class RawViews(NamedTuple):
    """What the loader yields with --gpu-aug: the decoded images on one uint8 canvas (top-left aligned) and their
    parameters (N, V, F). A NamedTuple, so that pin_memory copies its tensors."""

    canvas: torch.Tensor
    params: torch.Tensor


class Views:
    """A recipe: a list of ViewSpecs. `sizes`: each view's side."""

    def __init__(self, specs):
        self.specs, self.sizes = list(specs), [s.size for s in specs]

    def draw(self, img, generator=None):
        """Per item (with Augmented's seeded generator): the decoded uint8 image and its (V, F) parameters."""
        return img, torch.stack([draw_params(s, img.shape[-2], img.shape[-1], generator) for s in self.specs])

    def render(self, images, params, normalise=False):
        """The views of a batch: images (a list of uint8 (3, H, W), or an (N, 3, H, W) canvas on the device that
        does the work), params (N, V, F) on the CPU. Views of one size are processed together, a few MB of
        pixels at a time (cache-sized on a CPU). Returns one tensor per view: uint8, or normalised float32 where
        asked or where the view adds noise."""
        n, out, device = len(params), [None] * len(self.specs), images[0].device
        by_size = {}
        for v, spec in enumerate(self.specs):
            by_size.setdefault(spec.size, []).append(v)
        for size, group in by_size.items():
            rows = params[:, group].transpose(0, 1).reshape(-1, len(FIELDS))  # view-major: (G n, F)
            as_float = normalise or bool(rows[:, COL.noise].any())
            x = torch.empty(len(rows), 3, size, size, device=device, dtype=torch.float32 if as_float else torch.uint8)
            order = render_order(rows)
            sorted_rows, taps = rows[order], min(blur_kernel(size), BLUR_TAPS_MAX)
            chunk = rows_per_chunk(size, len(rows), device)
            for start in range(0, len(rows), chunk):
                host_p, ids = sorted_rows[start : start + chunk], order[start : start + chunk] % n
                src = images[ids.to(device)] if torch.is_tensor(images) else [images[i] for i in ids.tolist()]
                p = host_p.to(device, non_blocking=True)
                y = render(cut_crops(src, p, host_p, size), p, host_p, taps)
                if host_p[:, COL.noise].any():
                    y = y + p[:, COL.noise].view(-1, 1, 1, 1) * 255 * pixel_noise(host_p, y)
                x[start : start + len(host_p)] = normalize_batch(y) if as_float else to_uint8(y)
            x = x.index_select(0, order.argsort().to(device))  # back to view-major order
            for j, v in enumerate(group):
                out[v] = x[j * n : (j + 1) * n]
        return out

    def collate(self, batch):
        """Loader workers: [((image, params), label)] -> (views, labels), the views rendered on this CPU."""
        images, params = zip(*[item for item, _ in batch])
        labels = torch.tensor([label for _, label in batch])
        return self.render(list(images), torch.stack(params)), labels

    def collate_raw(self, batch):
        """--gpu-aug: the decoded images on one uint8 canvas and the parameters, for render_on_device."""
        images, params = zip(*[item for item, _ in batch])
        h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        canvas = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
        for c, img in zip(canvas, images):
            c[:, : img.shape[1], : img.shape[2]] = img
        return RawViews(canvas, torch.stack(params)), torch.tensor([label for _, label in batch])

    def render_on_device(self, raw, device):
        """--gpu-aug: a loader's RawViews rendered on the training device, normalised float32 views."""
        return self.render(raw.canvas.to(device, non_blocking=True), raw.params, normalise=True)

    def __call__(self, img, generator=None):
        """One image's views, normalised float (3, S, S) each."""
        img, params = self.draw(img, generator)
        return [v[0] for v in self.render([img], params[None], normalise=True)]


def two_views(size, **spec):
    return Views([ViewSpec(size, **spec)] * 2)


def byol_views(size, blur=(1.0, 0.1), solarize=(0.0, 0.2), scale=(0.08, 1.0)):
    return Views([ViewSpec(size, scale, blur_p=b, solarize_p=s) for b, s in zip(blur, solarize)])


def multi_crop(size, local_crops, patch, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
    """DINO: BYOL's two global views, then `local_crops` small crops (blur p 0.5) of 96/224 of the side, rounded
    to a multiple of the ViT patch."""
    local_size = max(patch, round(size * 96 / 224 / patch) * patch)
    local = ViewSpec(local_size, local_scale, blur_p=0.5)
    return Views(byol_views(size, scale=global_scale).specs + [local] * local_crops)


def strength(s):
    return {"jitter": (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)}


RECIPES = {
    # SimCLR, ImageNet (paper App. A): colour strength 1, blur p 0.5 on both views.
    "simclr": lambda size, **_: two_views(size, **strength(1.0), blur_p=0.5),
    # SimCLR, CIFAR (paper App. B.9): colour strength 0.5, no blur.
    "simclr-cifar": lambda size, **_: two_views(size, **strength(0.5)),
    # BYOL (paper Table 6), also the official VICReg and Barlow Twins code: asymmetric blur and solarize.
    "byol": lambda size, **_: byol_views(size),
    # VICReg as its paper describes it: BYOL's pipeline made symmetric.
    "vicreg-symmetric": lambda size, **_: byol_views(size, blur=(0.5, 0.5), solarize=(0.1, 0.1)),
    # solo-learn's CIFAR configs (scripts/pretrain/cifar): BYOL's asymmetric solarize without blur ...
    "byol-cifar": lambda size, **_: byol_views(size, blur=(0.0, 0.0)),
    # ... and VICReg's symmetric set with crops of 0.2-1, solarize 0.1 on both views, no blur.
    "vicreg-cifar": lambda size, **_: byol_views(size, blur=(0.0, 0.0), solarize=(0.1, 0.1), scale=(0.2, 1.0)),
    # MAE: one random resized crop of scale 0.2-1 and a flip, no colour (paper App. A.1).
    "mae": lambda size, **_: Views([ViewSpec(size, (0.2, 1.0), jitter_p=0.0, gray_p=0.0)]),
    # DINO's multi-crop (ViT): global crops of scale 0.4-1, local crops of 0.05-0.4.
    "dino": lambda size, local_crops=0, patch=1, **_: multi_crop(size, local_crops, patch),
    # DINO's ResNet-50 command: wider global and narrower local crops (0.14-1: the official advice without local crops).
    "dino-resnet": lambda size, local_crops=0, patch=1, **_: multi_crop(
        size, local_crops, patch, (0.14, 1), (0.05, 0.14)
    ),
    # Bordes et al. 2023: Gaussian noise (std 0.1 on the 0-1 scale) as the only augmentation of the positive pair.
    "noise-only": lambda size, **_: Views([ViewSpec(size, noise=0.1)]),
}


def make_views(name, size, views=2, local_crops=0, patch=1):
    """The named recipe at `size`, mapped onto the `views` a method consumes (0: all the recipe makes, at least 2).
    A recipe with fewer views repeats them as independent draws (mae, noise-only: the same transform twice); one
    with more keeps its first (dino for a two-view method: the two global crops; any recipe for MAE: view 1).
    Multi-crop recipes also take local_crops and patch (local sides are multiples of the patch)."""
    if name not in RECIPES:
        raise UserError(f"unknown augmentation recipe {name!r}; choose from {', '.join(RECIPES)}")
    recipe = RECIPES[name](size, local_crops=local_crops, patch=patch)
    picks = [i % len(recipe.specs) for i in range(views or max(2, len(recipe.specs)))]
    return Views([recipe.specs[i] for i in picks])


# ----------------------------------------------------------------------------------------------------------
# Backbones: torchvision's ResNets (any width, either stem) and a pre-norm ViT with timm's parameter names.


def drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: one strided convolution (timm's name for it: patch_embed.proj)."""

    def __init__(self, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)


class VisionTransformer(nn.Module):
    """Pre-norm ViT with timm's parameter names. `embed` gives patch tokens with position embeddings (resized
    for other resolutions); `encode` runs the blocks on any subset of them (MAE's visible patches), and
    `last_block_tokens` keeps the last blocks' outputs (DINO's linear probe)."""

    def __init__(self, img_size, patch_size, dim, depth, heads, drop_path=0.0):
        super().__init__()
        self.patch_size, self.embed_dim, self.grid = patch_size, dim, img_size // patch_size
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth rises linearly
        self.blocks = nn.ModuleList(Block(dim, heads, drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def patch_pos_embed(self, h, w):
        pos = self.pos_embed[:, 1:]
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)

    def embed(self, x):
        x = self.patch_embed.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2) + self.patch_pos_embed(*x.shape[2:])  # (B, h*w, D)

    def encode(self, tokens):
        return self.last_block_tokens(tokens, 1)[0]  # (B, 1 + L, D)

    def last_block_tokens(self, tokens, n):
        """[CLS] and `tokens` through the blocks: the outputs of the last n blocks, each through the final norm
        (DINO's get_intermediate_layers; the next block reads the un-normalised tokens), a list of (B, 1 + L, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def forward(self, x):
        return self.encode(self.embed(x))[:, 0]


RESNET_LAYERS = {
    "resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
}


class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet (its parameter names and initialisation, so backbone.pt loads into it) without the
    classifier: every layer `width` times as wide (SimCLR's 2x and 4x ResNet-50, or narrow nets for short CPU runs),
    and on request the CIFAR stem (a 3x3 stride-1 conv, no max-pool) and zero-initialised residual branches (the last
    BatchNorm of every block: the official SimCLR, BYOL and VICReg code). `embed_dim` is its output width."""

    def __init__(self, arch, width=1.0, cifar_stem=False, zero_init_residual=False):
        block, depths = RESNET_LAYERS[arch]
        super().__init__(block, depths)
        if width != 1:  # the same blocks and initialisation, rebuilt wider or narrower
            planes = [max(1, round(64 * width)) * 2**i for i in range(4)]
            self.inplanes, self.bn1 = planes[0], nn.BatchNorm2d(planes[0])
            self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
            for i, (p, depth) in enumerate(zip(planes, depths)):
                setattr(self, f"layer{i + 1}", self._make_layer(block, p, depth, stride=1 if i == 0 else 2))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, self.bn1.num_features, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        if zero_init_residual:  # every residual block starts as the identity (Goyal et al. 2017)
            last_norm = "bn2" if block is torchvision.models.resnet.BasicBlock else "bn3"
            for m in self.modules():
                if isinstance(m, block):
                    nn.init.zeros_(getattr(m, last_norm).weight)
        self.fc = nn.Identity()
        self.embed_dim = ARCHS[arch] * self.bn1.num_features // 64


def build_backbone(args, drop_path=0.0):
    """The --arch backbone: a ResNet (the CIFAR stem at 64 px and below unless --stem says otherwise) or a ViT
    (stochastic depth `drop_path`). Its `embed_dim` is its output width."""
    if args.arch.startswith("vit"):
        dim, depth, heads = ARCHS[args.arch]
        return VisionTransformer(args.img_size, args.patch_size, dim, depth, heads, drop_path)
    cifar_stem = args.stem == "cifar" or (args.stem == "auto" and args.img_size <= 64)
    return ResNet(args.arch, args.width, cifar_stem, args.zero_init_residual)


# ----------------------------------------------------------------------------------------------------------
# Optimisation: LARS, the optimizers, the scaled learning rate, schedules, the EMA, and a step's FLOPs.


class LARS(torch.optim.Optimizer):
    """LARS as in the official SimCLR/BYOL/VICReg code: weight decay, then the trust ratio eta*||p||/||g||, then
    momentum; 1-D parameters (biases, norms) skip both the decay and the trust ratio. clip: solo-learn's clip_lr
    (apex's LARC clip mode), a layer's rate is its trust ratio capped at the lr, min(trust, lr), where it is
    lr x trust without clip. solo-learn's ratio divides by ||g|| + wd*||p|| + 1e-8 where this one divides by
    ||g + wd*p|| (the two agree when wd is 0 and differ by at most 2 wd*||p||)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001, clip=False):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "clip": clip}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = group["eta"] * p_norm / d_norm
                    if group["clip"]:  # solo-learn's clip_lr: the layer's rate becomes min(trust, lr), not lr x trust
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), trust, torch.ones_like(trust))
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
                self.state[p]["mu"].mul_(group["momentum"]).add_(d)
                p.add_(self.state[p]["mu"], alpha=-group["lr"])


def scaled_lr(args, env):
    """The peak learning rate: --lr is per 256 images, scaled linearly with the global batch (the papers' rule)."""
    lr = args.lr * args.batch / 256
    if env.main:
        print(f"lr {args.lr} x {args.batch}/256 = {lr:g}")
    return lr


def build_optimizer(args, env, model, lr, betas=(0.9, 0.999)):
    """LARS (handles 1-D exclusion itself), or SGD/AdamW with no weight decay on 1-D parameters; group 0 holds the
    decayed weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=args.wd, eta=args.lars_eta, clip=bool(args.lars_clip))
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=env.device.type == "cuda")
    raise UserError(f"unknown --optimizer {args.optimizer!r}; choose from lars, sgd, adamw")


def cosine_schedule(step, total_steps, warmup_steps, peak, final=0.0):
    """Linear warmup from 0 to `peak`, then half-cycle cosine from `peak` to `final`; evaluated per step."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, parameters and float buffers (BN statistics) alike.
    `online` is a list of modules whose state_dicts, concatenated, line up with the target's."""
    target_state = list(target.state_dict().values())
    online_state = [t for module in online for t in module.state_dict().values()]
    floats = [(t, o) for t, o in zip(target_state, online_state, strict=True) if t.is_floating_point()]
    torch._foreach_lerp_([t for t, _ in floats], [o for _, o in floats], 1 - momentum)
    for t, o in zip(target_state, online_state):
        if not t.is_floating_point():  # BN's num_batches_tracked
            t.copy_(o)


def flop_count(net, views):
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    cuda = [views[0].device] if views[0].is_cuda else []
    with torch.random.fork_rng(devices=cuda), FlopCounterMode(display=False) as counter:
        loss, _ = net(views)
        loss.backward()
    net.load_state_dict(buffers, strict=False)
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def count_step_flops(net, sizes, args, env):
    """FLOPs of one training step (forward and backward, every view) summed over the processes, counted once on
    blank views of the given sides. Buffers (BN statistics, centers) and RNG are restored afterwards."""
    local_batch = per_process_batch(args, env)
    views = to_device([torch.zeros(local_batch, 3, s, s, device=env.device) for s in sizes], args, env)
    return flop_count(net, views) * env.world


def training_steps(args, steps_per_epoch, flops_per_step):
    """The run's length in optimizer steps: --epochs of them, or with --budget-flops as many as the budget pays
    for, so that the schedules span exactly those steps."""
    if not args.budget_flops:
        return args.epochs * steps_per_epoch
    steps = int(args.budget_flops // flops_per_step)
    if steps < 1:
        raise UserError(f"--budget-flops {args.budget_flops:g} buys no step ({flops_per_step:.3g} FLOPs per step)")
    return steps


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and logs: atomic writes, save and resume, args.json, log.jsonl with its progress bar, the
# non-finite-loss stop, and summary.json.


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def atomic_save(obj, path, save=torch.save):
    """save(obj, file) to a temporary file in the same folder, flush to disk, then rename: a kill leaves the old
    file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


EXIT_PREEMPTED = 75  # sysexits.h's EX_TEMPFAIL ("try again"): rerunning the same command resumes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_signals = SimpleNamespace(received=[], previous={})
# Set when a training process exits: its loader workers, which ignore stop signals until then, may end.
_exiting = multiprocessing.RawValue("b", 0)
atexit.register(setattr, _exiting, "value", 1)  # runs before multiprocessing's exit, which terminates the workers


class Preempted(Exception):
    """A stop signal's checkpoint is written; run() prints the message and exits with EXIT_PREEMPTED."""


def loader_worker_signals(worker_id, exiting):
    """A loader worker's SIGTERM and SIGUSR1 handler: a cluster signals every process of a job, and the training
    process, which finishes its step and checkpoints, still needs its workers; they end once `exiting` is set."""

    def on_signal(signum, frame):
        if exiting.value:
            os._exit(0)

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, on_signal)


# Passed along, so that spawned workers (macOS, Python 3.14's forkserver) read this process's flag, not their own.
loader_worker_init = functools.partial(loader_worker_signals, exiting=_exiting)


def restore_signal_handlers():
    for stop_signal, handler in _signals.previous.items():
        signal.signal(stop_signal, handler)
    _signals.previous.clear()


class Preemption:
    """When to checkpoint within an epoch: every --ckpt-every steps, and after a SIGTERM (what SLURM sends on
    preemption or at the time limit, a grace period before SIGKILL) or SIGUSR1 (sbatch --signal=USR1@120), after
    which the run finishes its step, checkpoints and exits with EXIT_PREEMPTED. The handlers are installed here
    (a signal before, while the data and model are built, ends the process at once) and removed by run(). Under
    torchrun the processes agree at every step, with one all-reduce of a flag over a gloo group, on the CPU: it
    waits for the other processes, never for the device, so that all of them checkpoint after the same step."""

    def __init__(self, args, env, steps_per_epoch, total_steps):
        self.every, self.steps_per_epoch, self.total_steps = args.ckpt_every, steps_per_epoch, total_steps
        self.path = os.path.join(args.out, "checkpoint.pt")
        self.group = dist.new_group(backend="gloo") if env.world > 1 else None
        _signals.received.clear()
        for stop_signal in STOP_SIGNALS:
            previous = signal.signal(stop_signal, lambda signum, frame: _signals.received.append(signum))
            _signals.previous.setdefault(stop_signal, previous)

    def signalled(self):
        """The first stop signal any process received (0: none); a collective under torchrun."""
        received = torch.tensor([_signals.received[0] if _signals.received else 0])
        if self.group is not None:
            dist.all_reduce(received, op=dist.ReduceOp.MAX, group=self.group)
        return int(received)

    def checkpoint_due(self, step):
        """Whether to checkpoint after this step, within its epoch (an epoch's last step checkpoints anyway)."""
        periodic = self.every and step % self.every == 0 and step % self.steps_per_epoch
        return bool(self.signalled() or periodic)

    def stop_if_signalled(self, step):
        """After a checkpoint: raise Preempted if a stop signal came and the run has steps left."""
        received = self.signalled()
        if received and step < self.total_steps:
            name = signal.Signals(received).name
            raise Preempted(f"stopped by {name} after step {step}: {self.path} is written; the same command resumes")


def save_checkpoint(args, env, epoch, step, net, optimizer, scaler, backbone, log, steps_per_epoch, probe):
    """checkpoint.pt (everything to resume: the model, optimizer, GradScaler, the online probe, every process's RNG
    state and log interval, the run's arguments, steps per epoch and process count) and `backbone` as backbone.pt,
    both written atomically. `epoch` is the epoch a resume starts in: the current one within an epoch (the resume
    skips the batches it trained), the next one at its end. A non-finite loss since the last logged interval stops
    the run here, keeping the last good checkpoint."""
    if log.count:  # within an interval: its losses were not checked yet (one host sync per checkpoint)
        check_finite(float(log.loss_sum) / log.count, step)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(env.device)
    local = {"rng": rng, "log": log.state()}
    processes = [local] * env.world
    if env.world > 1:
        dist.all_gather_object(processes, local)
    if not env.main:
        return
    state = {
        "method": args.method,
        "arch": args.arch,
        "img_size": args.img_size,
        "resume_epoch": epoch,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "world": env.world,
        "rng": [process["rng"] for process in processes],
        "log": [process["log"] for process in processes],
        "args": vars(args),
    }
    state.update(model=net.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    state["online_probe"] = probe.state_dict()
    atomic_save(state, os.path.join(args.out, "checkpoint.pt"))
    atomic_save(backbone.state_dict(), os.path.join(args.out, "backbone.pt"))


# What a resume may change: how the run is fed, watched and checkpointed, never what it trains.
RESUMABLE_CHANGES = ("workers", "log_every", "knn_every", "online_probe", "ckpt_every", "compile", "out", "recon")


class Resumed(NamedTuple):
    epoch: int  # the epoch to continue in
    step: int  # the global steps already trained
    log: dict | None  # this process's unfinished log interval (TrainLog.state), None for a new run


def flag(dest):
    """The command-line spelling of an argument: log_every -> --log-every."""
    return "--" + dest.replace("_", "-")


def refuse_changed_run(path, saved, args):
    """The arguments a resume may not change (everything but RESUMABLE_CHANGES) must equal the checkpoint's;
    returns the changes it may make, as {flag: (saved, now)}."""
    now = vars(args)
    changed = {name: (saved[name], now[name]) for name in now if name in saved and saved[name] != now[name]}
    refused = [
        f"{flag(name)} {old} (now {new})" for name, (old, new) in changed.items() if name not in RESUMABLE_CHANGES
    ]
    if refused:
        raise UserError(
            f"{path} was trained with {', '.join(refused)}; a resume continues the same run, so use a new --out "
            "for a changed one (extending a finished run too)"
        )
    return {name: values for name, values in changed.items() if name in RESUMABLE_CHANGES}


def refuse_changed_data(path, state, env, steps_per_epoch):
    """A resume must see the training set the checkpoint saw (its steps per epoch), and within an epoch the same
    process count: each process's share of an epoch's shuffled order depends on it."""
    saved = state.get("steps_per_epoch", steps_per_epoch)
    if saved != steps_per_epoch:
        raise UserError(
            f"{path} was trained at {saved} steps an epoch, the training set now gives {steps_per_epoch}: it changed; "
            "use a new --out for a changed run"
        )
    within = 0 < state["step"] - state["resume_epoch"] * steps_per_epoch < steps_per_epoch
    if within and state.get("world", env.world) != env.world:
        raise UserError(
            f"{path} was written within epoch {state['resume_epoch']} by {state['world']} processes: resume it on "
            f"{state['world']} (the epoch's data are split by process count), or from an epoch end"
        )


def remove_half_written(out, env):
    """The temporary files of a save that a kill interrupted (rank 0)."""
    for name in os.listdir(out) if env.main else []:
        if ".pt.tmp" in name:
            os.remove(os.path.join(out, name))


def resume(args, env, net, optimizer, scaler, steps_per_epoch, probe):
    """Load checkpoint.pt from --out if there is one into the model, optimizer, GradScaler, online probe and RNGs,
    refusing another method's run, any change to what is trained (refuse_changed_run) or to the training set
    (refuse_changed_data); the changes a resume may make are printed and appended to resumes.jsonl. Returns
    Resumed: (0, 0, None) for a new run."""
    path = os.path.join(args.out, "checkpoint.pt")
    if not os.path.exists(path):
        remove_half_written(args.out, env)
        return Resumed(0, 0, None)
    try:
        state = torch.load(path, map_location=env.device, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({e}); move it away to start afresh") from None
    for key, want in [("method", args.method), ("arch", args.arch), ("img_size", args.img_size)]:
        if state.get(key) != want:
            found = f"{key} {state.get(key)!r} run, not {want!r}"
            raise UserError(f"{path} holds a {found}; use another --out to start afresh, or delete it")
    state.setdefault("resume_epoch", state.get("epoch", -1) + 1)  # checkpoints before --ckpt-every: epoch ends
    allowed = refuse_changed_run(path, state.get("args") or read_args(args.out), args)
    refuse_changed_data(path, state, env, steps_per_epoch)
    remove_half_written(args.out, env)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    probe.load_state_dict(state.get("online_probe"))
    same_world = len(state["rng"]) == env.world  # another process count: fresh seeds, and an epoch end's empty log
    if same_world:
        rng = state["rng"][env.rank]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), env.device)
    epoch, log = state["resume_epoch"], state["log"][env.rank] if same_world and state.get("log") else None
    if env.main:
        changes = "".join(f"; {flag(name)} {old} -> {new}" for name, (old, new) in allowed.items())
        print(f"resumed from {path} in epoch {epoch} at step {state['step']}{changes}")
        with open(os.path.join(args.out, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"step": state["step"], "epoch": epoch, "changed": allowed}) + "\n")
    return Resumed(epoch, state["step"], log)


def read_json(path):
    """The JSON object in path, None when there is no such file; an unreadable file or one holding something else
    is a UserError."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(result, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return result


def read_args(out):
    """The args.json in a run folder, {} without one."""
    return read_json(os.path.join(out, "args.json")) or {}


def write_args(args, env):
    """args.json: every argument after defaults (rank 0)."""
    if env.main:
        write_json(os.path.join(args.out, "args.json"), vars(args))


def read_log(path):
    """The records of a log.jsonl; a last line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def truncate_log(path, step):
    """Drop the records logged after `step`, the checkpoint's; returns the records kept."""
    kept = [record for record in read_log(path) if record["step"] <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(f"{path}.tmp", path)
    return kept


SUMMARY_KEYS = ("knn_top1", "online_top1")  # the monitors' last values, for summary.json


class TrainLog:
    """log.jsonl on rank 0 and a tqdm bar per epoch, continued at `step`: the records a killed run logged after its
    last checkpoint are dropped, and `saved` (the checkpoint's state()) continues the interval it was in, so the
    log of a resumed run reads as the log of one uninterrupted run. Losses (and the values to average over an
    interval, such as the online probe's training accuracy) accumulate on the device (add); the host reads them only
    when an interval is written (write_interval), so the training loop never waits for the device within an
    interval. Each record carries the training wall time so far ("time", seconds, summed over resumed
    runs); finish() writes summary.json."""

    def __init__(self, args, env, flops_per_step, step, saved=None):
        self.args, self.env, self.flops_per_step = args, env, flops_per_step
        self.bar, self.loss_sum, self.scalars, self.sums, self.count = None, 0.0, {}, {}, 0
        self.path = os.path.join(args.out, "log.jsonl")
        records = truncate_log(self.path, step) if env.main else []
        self.tick = time.perf_counter()
        self.elapsed = records[-1].get("time", 0.0) if records else 0.0  # training wall time at the last record
        if saved is not None:
            on_device = {name: value.to(env.device) for name, value in saved["scalars"].items()}
            loss_sum = saved["loss_sum"].to(env.device) if saved["count"] else 0.0
            self.loss_sum, self.count, self.scalars = loss_sum, saved["count"], on_device
            self.sums = {name: value.to(env.device) for name, value in saved.get("sums", {}).items()}
            self.tick, self.elapsed = self.tick - saved["interval_s"], saved["elapsed"]
        self.start = time.perf_counter() - self.elapsed
        self.last = {key: next((r[key] for r in reversed(records) if key in r), None) for key in SUMMARY_KEYS}

    def state(self):
        """The unfinished interval (the losses and averaged values summed on the device, their count, the last step's
        scalars, its seconds so far) and the training wall time, for a checkpoint."""
        now = time.perf_counter()
        on_cpu = {name: torch.as_tensor(value).detach().cpu() for name, value in self.scalars.items()}
        sums = {name: value.cpu() for name, value in self.sums.items()}
        loss_sum = self.loss_sum.cpu() if self.count else 0.0  # on the CPU, to be gathered from every process
        interval = {"loss_sum": loss_sum, "count": self.count, "scalars": on_cpu, "sums": sums}
        interval["interval_s"] = now - self.tick
        return {**interval, "elapsed": now - self.start}

    def progress(self, loader, epoch):
        """The loader's batches with a progress bar (rank 0)."""
        self.bar = tqdm(loader, desc=f"epoch {epoch}", disable=not self.env.main, leave=False, dynamic_ncols=True)
        return self.bar

    def add(self, loss, scalars, averaged=None):
        """Accumulate one step's loss and `averaged` values on the device (no host sync); keep the step's method
        scalars."""
        self.loss_sum, self.count, self.scalars = self.loss_sum + loss.detach(), self.count + 1, scalars
        for name, value in (averaged or {}).items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach()

    def write_interval(self, epoch, step, lr):
        """Write the interval's record (mean loss, lr, images/s, FLOPs so far, the last step's scalars, the averaged
        values' means) and return its mean loss: the loop's only host sync, once per interval."""
        mean_loss = float(self.loss_sum) / self.count
        now = time.perf_counter()
        img_per_s = self.count * self.args.batch / (now - self.tick)
        record = {"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr, "img_per_s": img_per_s}
        record.update(flops=step * self.flops_per_step, **{k: float(v) for k, v in self.scalars.items()})
        record.update({name: float(total) / self.count for name, total in self.sums.items()})
        self.tick, self.loss_sum, self.sums, self.count = now, 0.0, {}, 0
        self.write(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{img_per_s:.0f}")
        return mean_loss

    def write(self, record):
        self.last.update({key: record[key] for key in SUMMARY_KEYS if key in record})
        self.elapsed = round(time.perf_counter() - self.start, 3)
        if self.env.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "time": self.elapsed}) + "\n")

    def finish(self, step):
        """summary.json: what the run cost and what it reached, for comparisons at equal compute."""
        if not self.env.main:
            return
        summary = {
            "method": self.args.method,
            "arch": self.args.arch,
            "flops": step * self.flops_per_step,
            "steps": step,
        }
        summary.update(images_seen=step * self.args.batch, wall_time_s=self.elapsed, **self.last)
        write_json(os.path.join(self.args.out, "summary.json"), summary)


def check_finite(loss, step):
    """Stop the run on a NaN or infinite loss, before the next checkpoint: the last good one stays."""
    if not math.isfinite(loss):
        advice = "lower --lr, or try --amp off; the last good checkpoint is kept"
        raise UserError(f"loss became {loss} by step {step}: {advice}")


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the center-crop transform, features of a data set over the processes, the weighted k-NN
# classifier, and the k-NN monitor that runs during training.


def eval_transform(size):
    """Resize (to size/0.875 above 64 px, the usual 256->224 center crop) and center crop; uint8 (to_device
    normalises)."""
    resize = size if size <= 64 else round(size / 0.875)
    bicubic = v2.InterpolationMode.BICUBIC
    return v2.Compose([v2.Resize(resize, interpolation=bicubic, antialias=True), v2.CenterCrop(size)])


@torch.no_grad()
def extract_features(backbone, dataset, args, env, batch=256):
    """Backbone features (float32) and labels of a dataset, computed in shards over the processes."""
    n, world = len(dataset), world_size()
    per_rank = -(-n // world)
    ids = [i % n for i in range(rank() * per_rank, (rank() + 1) * per_rank)]
    shard = torch.utils.data.Subset(dataset, ids)
    own = torch.Generator()  # evaluation leaves the training RNG untouched
    workers = {"num_workers": args.workers, "worker_init_fn": loader_worker_init}
    loader = DataLoader(shard, batch, pin_memory=env.device.type == "cuda", generator=own, **workers)
    amp, _ = autocast(args, env)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for img, label in loader:
        with amp():
            feats.append(backbone(to_device([img], args, env)[0]).float())
        labels.append(label.to(env.device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:
        parts = [[torch.empty_like(t) for _ in range(world)] for t in (feats, labels)]
        dist.all_gather(parts[0], feats)
        dist.all_gather(parts[1], labels)
        feats, labels = torch.cat(parts[0])[:n], torch.cat(parts[1])[:n]
    return feats, labels


def knn_predict(train_feats, train_labels, test_feats, k=20, temperature=0.07, chunk=1024):
    """Weighted k-NN (DINO's eval_knn): the k most cosine-similar training samples vote with exp(sim / T)."""
    train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    classes = int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    preds = []
    for part in test_feats.split(chunk):
        sim, idx = (part @ train_feats.T).topk(k, dim=1)
        votes = torch.zeros(len(part), classes, device=part.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_f, train_l, test_f, test_l, ks=(20, 200)):
    """{'knn_top1': top-1 % at ks[0], 'knn_top1_k<k>': at the others}."""
    top1 = {k: 100.0 * (knn_predict(train_f, train_l, test_f, k) == test_l).float().mean().item() for k in ks}
    return {("knn_top1" if k == ks[0] else f"knn_top1_k{k}"): v for k, v in top1.items()}


def labelled_splits(args, subset=0):
    """(labelled training split, optionally a random subset of it; test split), or None without labels."""
    memory, test = build_dataset(args, "memory"), build_dataset(args, "test")
    if test is None or not memory.labelled:
        return None
    return (random_subset(memory, subset, args.seed) if subset else memory), test


def split_features(backbone, splits, args, env):
    """(train features, train labels, test features, test labels) of the center-cropped images."""
    transform = eval_transform(args.img_size)
    return [t for ds in splits for t in extract_features(backbone, Augmented(ds, transform), args, env)]


def knn_monitor(backbone, args, env, epoch, epochs, probe):
    """k-NN top-1 and the online probe's top-1 (on the same test features) every --knn-every epochs and after the
    last of `epochs`; {} otherwise or without labels."""
    last = epoch + 1 == epochs
    if not args.knn_every or ((epoch + 1) % args.knn_every and not last):
        return {}
    splits = labelled_splits(args)
    if splits is None:
        if env.main and last:
            print("k-NN monitor skipped: the data set has no labelled train/ and val/ (or test/)")
        return {}
    train_f, train_l, test_f, test_l = split_features(backbone, splits, args, env)
    results = {**knn_accuracy(train_f, train_l, test_f, test_l), **probe.evaluate(test_f, test_l)}
    if env.main:
        online = f", online linear top-1 {results['online_top1']:.2f}" if "online_top1" in results else ""
        print(f"epoch {epoch}: k-NN top-1 {results['knn_top1']:.2f}{online}")
    return results


# ----------------------------------------------------------------------------------------------------------
# The online linear probe: a classifier trained alongside pretraining on the backbone's detached features.

PROBE_LR = 0.1  # per 256 images: SGD with momentum 0.9, no weight decay, a cosine over the run (solo-learn, lightly)


class OnlineProbe:
    """The online linear probe (SimCLR App. B.6, BYOL's online classifier, solo-learn, Garrido et al.): a linear
    classifier on the detached backbone features of every batch's first view, trained with an optimizer of its own
    while the method trains, and scored on the test split whenever the k-NN monitor runs (`online_top1`).

    It never changes the backbone's training. It reads the features the backbone computes anyway, through a
    forward hook that keeps the first training-mode call of each step (the first rows are the first view); only
    where the backbone never runs on whole images (MAE's encoder sees the visible patches) does it compute them,
    in one no-grad forward in eval mode. Its weights start at zero, so it draws no random numbers; its gradients
    reach nothing else; its FLOPs are not counted in the run's. Under DDP its gradients are averaged over the
    processes. Off, and every method a no-op, with --online-probe 0 or when the data set has no labelled splits
    (unlabelled training images, label -1, are ignored)."""

    def __init__(self, backbone, args, env, total_steps):
        splits = labelled_splits(args) if args.online_probe else None
        self.enabled, self.features = splits is not None, None
        if not self.enabled:
            return
        self.backbone, self.args, self.env, self.total_steps = backbone, args, env, total_steps
        # skip_init: nn.Linear's own init would draw from the global RNG, which MAE's masks and DINO's drop-path use
        self.head = nn.utils.skip_init(nn.Linear, backbone.embed_dim, splits[0].num_classes, device=env.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.peak_lr = PROBE_LR * args.batch / 256
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.peak_lr, momentum=0.9)
        backbone.register_forward_hook(self.keep_first_call)

    def keep_first_call(self, module, inputs, output):
        if module.training and self.features is None:
            self.features = output.detach()

    def step(self, views, labels, step):
        """One SGD step of the classifier on this step's features; returns {"online_train_top1": %} (on the device:
        the log averages it over the interval), {} when off."""
        if not self.enabled:
            return {}
        features = self.features if self.features is not None else self.whole_image_features(views[0])
        self.features = None
        labels = labels.to(self.env.device, non_blocking=True)
        logits = self.head(features[: len(labels)].float())
        loss = F.cross_entropy(logits, labels, ignore_index=-1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.env.world > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.env.world
        set_lr(self.optimizer, cosine_schedule(step, self.total_steps, 0, self.peak_lr))
        self.optimizer.step()
        known = labels >= 0
        correct = (logits.argmax(1) == labels) & known
        return {"online_train_top1": 100.0 * correct.sum() / known.sum().clamp(min=1)}

    @torch.no_grad()
    def whole_image_features(self, images):
        amp, _ = autocast(self.args, self.env)
        self.backbone.eval()
        with amp():
            features = self.backbone(images)
        self.backbone.train()
        return features

    @torch.no_grad()
    def evaluate(self, test_features, test_labels):
        """{"online_top1": top-1 % on the test split's features}, {} when off."""
        if not self.enabled:
            return {}
        predictions = self.head(test_features.float()).argmax(1)
        return {"online_top1": 100.0 * (predictions == test_labels).float().mean().item()}

    def state_dict(self):
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()} if self.enabled else None

    def load_state_dict(self, state):
        if self.enabled and state is not None:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
