"""Frozen-backbone evaluation of any backbone.pt: a linear probe and a weighted k-NN classifier.

Usage:
    python eval_linear.py --ckpt runs/simclr/backbone.pt                   # arch, data, size from args.json beside it
    python eval_linear.py --ckpt random --arch resnet18 --dataset cifar10  # the same arch at random init: the baseline
    python eval_linear.py --ckpt runs/simclr/backbone.pt --protocol augmented --epochs 90 --batch 4096 --lr 0.1

Protocols:
  features (default, fast): features of the center-cropped images are computed once; a linear classifier is
      trained on them for --epochs (SGD with Nesterov momentum 0.9, cosine, no weight decay). Without --lr, the
      learning rate is chosen from a small grid on a held-out 10% of the training set (as BYOL App. C.1), then
      the classifier is retrained on the whole training set.
  augmented: the papers' protocol, a random resized crop and flip, redrawn every epoch, through the frozen
      backbone (BatchNorm in inference mode), lr 0.1 x B/256 unless --lr says otherwise.
  The settings left on auto follow the run's method (args.json beside the checkpoint):
  - MAE: --bn-head on (BatchNorm1d without affine before the linear layer), and in the augmented protocol LARS
      (momentum 0.9, weight decay 0), batch 16384 (capped at the training set's size), 90 epochs, 10 of them
      warmup, then cosine: the official main_linprobe.py.
  - DINO ViTs: the probe reads the [CLS] tokens of the last 4 blocks, concatenated (ViT-S and smaller), or the
      last block's [CLS] token and its mean patch token (ViT-B), as the official eval_linear.py
      (--n-last-blocks, --avgpool); k-NN reads the final [CLS] token, as the official eval_knn.py.
k-NN: weighted cosine k-NN as DINO's eval_knn (k 20 and 200, T 0.07) on the center crops' features.

The published ImageNet numbers and the protocols that reproduce them (the backbone of the run the script's own
docstring names; --data and the ImageNet run folder are the user's):
  simclr  64.5 (100 ep) / 69.3 (1000 ep), ResNet-50 (paper Tables 1, 6; App. B.5: Nesterov SGD, 90 epochs, B 4096):
          --protocol augmented --epochs 90 --batch 4096 --lr 0.1
  byol    74.3 (1000 ep), ResNet-50 (App. C.1: Nesterov SGD, 80 epochs, B 1024, lr chosen from 0.4-0.05 on a
          held-out split; the official eval config: 0.2): --protocol augmented --epochs 80 --batch 1024 --lr 0.2
  vicreg  73.2 (1000 ep), ResNet-50 (official evaluate.py: SGD, 100 epochs, B 256, lr 0.02, wd 1e-6):
          --protocol augmented --epochs 100 --batch 256 --lr 0.02 --wd 1e-6
  dino    74.0 (ViT-S/16, 100 ep) and 77.0 (the 800-epoch release), last 4 [CLS] tokens (official eval_linear.py:
          SGD, 100 epochs, 128 per GPU on 8, lr swept around 0.001 x B/256): --protocol augmented --batch 1024
          --lr <swept>
  mae     68.0 (ViT-B/16, 1600 ep; [CLS] token, BatchNorm head, LARS, official FINETUNE.md):
          --protocol augmented (every setting on auto)
Departures: the sgd optimizer is always Nesterov (DINO's and VICReg's code use plain momentum); the probe's train
crops are the augmentation engine's, bicubic (DINO's probe: bilinear); MAE's probe normalises the head's BatchNorm
over the whole batch (16384 in one process; the official code: 512 per GPU); the augmented protocol runs in one
process. A random-init baseline for a DINO ViT run needs the run's probe flags (--n-last-blocks 4, or 1 with
--avgpool on for ViT-B): --ckpt random has no method to take them from.

The last line printed is a JSON object with linear_top1, knn_top1 (%), what was probed (features, feature_dim)
and the protocol's settings; it is also written to --out.
"""

import argparse
import json
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import common

LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# the protocol's settings, as resolved, that eval.json records
RECORDED_SETTINGS = (
    "protocol",
    "bn_stats",
    "optimizer",
    "epochs",
    "batch",
    "warmup_epochs",
    "wd",
    "bn_head",
    "n_last_blocks",
    "avgpool",
)


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="backbone.pt of a run, or 'random' for the randomly initialised arch")
    p.add_argument("--dataset", default=None, help="default: the run's (args.json), else synthetic")
    p.add_argument("--data", default=None, help="data root; default: the run's")
    p.add_argument("--arch", default=None, help="default: the run's, else resnet18")
    p.add_argument("--width", type=float, default=None, help="ResNet width multiplier; default: the run's, else 1")
    p.add_argument("--img-size", type=int, default=None, help="default: the run's, else the dataset's native size")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size; default: the run's")
    p.add_argument("--stem", default=None, help="ResNet stem auto|cifar|imagenet; default: the run's, else auto")
    p.add_argument("--protocol", default="features", choices=["features", "augmented"], help="see the docstring")
    p.add_argument("--epochs", type=int, default=None, help="linear classifier epochs; default 100 (MAE augmented: 90)")
    p.add_argument(
        "--batch", type=int, default=None, help="linear classifier batch size; default 256 (MAE augmented: 16384)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base lr per 256 images; default: chosen on a held-out split (features) or 0.1 (augmented)",
    )
    p.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "sgd", "lars"],
        help="sgd: Nesterov momentum 0.9; lars: LARS momentum 0.9 (MAE's probe); auto: lars for MAE augmented",
    )
    p.add_argument(
        "--warmup-epochs", type=float, default=None, help="linear warmup epochs; default 0 (MAE augmented: 10)"
    )
    p.add_argument("--wd", type=float, default=0.0, help="weight decay of the linear classifier")
    p.add_argument(
        "--bn-head",
        default="auto",
        choices=["auto", "on", "off"],
        help="BatchNorm(affine=False) before the classifier; auto: on for MAE",
    )
    p.add_argument(
        "--n-last-blocks",
        type=int,
        default=None,
        help="ViT: probe the [CLS] tokens of the last N blocks, concatenated; default 4 for DINO ViT-S/Ti, else 1",
    )
    p.add_argument(
        "--avgpool",
        default="auto",
        choices=["auto", "on", "off"],
        help="ViT: append the last block's mean patch token to the probed features; auto: on for DINO ViT-B",
    )
    p.add_argument(
        "--bn-stats",
        default="ckpt",
        choices=["ckpt", "data"],
        help="BatchNorm statistics: the checkpoint's (at random init: mean 0, variance 1), or re-estimated from the "
        "center crops of the training images",
    )
    p.add_argument("--subset", type=int, default=0, help="train the classifier on N training images (0: all)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA and native-bf16 CPUs, else off), bf16, fp16, off")
    p.add_argument("--seed", type=int, default=0, help="random seed (random init, data order)")
    p.add_argument(
        "--out", default=None, help="JSON result file; default: eval.json beside the checkpoint, or eval_random.json"
    )
    return common.with_checks(p).parse_args(argv)


def resolve(args):
    """A copy of args with the unset flags filled from the run's args.json (beside the checkpoint), then from
    defaults, and checked as the training scripts check theirs."""
    run = {}
    if args.ckpt != "random":
        if not os.path.isfile(args.ckpt):
            raise common.UserError(f"--ckpt {args.ckpt!r} does not exist; give a run's backbone.pt or 'random'")
        run = common.read_args(os.path.dirname(args.ckpt))
    defaults = {
        "dataset": "synthetic",
        "data": None,
        "arch": "resnet18",
        "width": 1.0,
        "img_size": None,
        "patch_size": None,
        "stem": "auto",
    }
    filled = {key: run.get(key, default) for key, default in defaults.items() if getattr(args, key) is None}
    # --ckpt random is torchvision's initialisation, residual branches included (the baseline the docstrings quote)
    from_run = {**filled, "method": run.get("method"), "zero_init_residual": 0}
    checked = common.check_args(argparse.Namespace(**{**vars(args), **from_run}))
    return argparse.Namespace(**{**vars(checked), **protocol_defaults(checked)})


def protocol_defaults(args):
    """The probe's settings left on auto, as the official code of the run's method runs them: MAE's augmented probe
    is LARS at batch 16384 for 90 epochs with 10 warmup and a BatchNorm head (main_linprobe.py); a DINO ViT is
    probed on the [CLS] tokens of its last 4 blocks (ViT-S and smaller) or on the last block's [CLS] token and
    mean patch token (ViT-B), as DINO's eval_linear.py; everything else is SGD, batch 256, 100 epochs, no warmup."""
    mae_augmented = args.method == "mae" and args.protocol == "augmented"
    vit = args.arch.startswith("vit")
    dino_vit, vit_base = args.method == "dino" and vit, args.arch == "vit_base"
    settings = {
        "optimizer": ("lars" if mae_augmented else "sgd") if args.optimizer == "auto" else args.optimizer,
        "epochs": (90 if mae_augmented else 100) if args.epochs is None else args.epochs,
        "batch": (16384 if mae_augmented else 256) if args.batch is None else args.batch,
        "warmup_epochs": (10 if mae_augmented else 0) if args.warmup_epochs is None else args.warmup_epochs,
        "bn_head": ("on" if args.method == "mae" else "off") if args.bn_head == "auto" else args.bn_head,
        "n_last_blocks": (1 if vit_base or not dino_vit else 4) if args.n_last_blocks is None else args.n_last_blocks,
        "avgpool": ("on" if dino_vit and vit_base else "off") if args.avgpool == "auto" else args.avgpool,
    }
    depth = common.ARCHS[args.arch][1] if vit else 1
    if not vit and (settings["n_last_blocks"] != 1 or settings["avgpool"] == "on"):
        raise common.UserError(f"--n-last-blocks and --avgpool read a ViT's blocks; --arch {args.arch} is a ResNet")
    if not 1 <= settings["n_last_blocks"] <= depth:
        raise common.UserError(f"--n-last-blocks {settings['n_last_blocks']} must be between 1 and {depth}")
    return settings


def load_backbone(args):
    torch.manual_seed(args.seed)
    backbone = common.build_backbone(args)
    if args.ckpt == "random":
        return backbone
    try:
        state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise common.UserError(f"{args.ckpt} is not a checkpoint torch can read ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise common.UserError(f"{args.ckpt} is not a state_dict; give the backbone.pt a run wrote")
    expected = backbone.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    misshaped = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or misshaped:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors"
        fix = "pass the run's --arch, --width, --img-size, --patch-size and --stem"
        raise common.UserError(f"{args.ckpt} does not fit --arch {args.arch} at {args.img_size} px ({counts}); {fix}")
    backbone.load_state_dict(state)
    return backbone


@torch.no_grad()
def estimate_bn_stats(backbone, train_set, args, env, images=4096):
    """Replace every BatchNorm's running statistics by their average over `images` center-cropped training images
    (train-mode forwards, no gradient). A network at random init has mean 0 and variance 1 there, so in eval mode
    its BatchNorms normalise nothing; this gives it the statistics any trained network has."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    subset = common.random_subset(train_set, min(images, len(train_set)), args.seed)
    center_crops = common.Augmented(subset, common.eval_transform(args.img_size))
    backbone.train()
    for img, _ in DataLoader(center_crops, args.batch, num_workers=args.workers):
        backbone(common.to_device([img], args, env)[0])
    backbone.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


class ProbedFeatures(nn.Module):
    """What the linear probe reads: the backbone's output, or for a ViT the [CLS] tokens of its last n blocks, each
    through the final norm, oldest first, then with avgpool the last block's mean patch token (DINO's
    eval_linear.py, which interleaves the last two: the same features in another order). `final` slices out the
    backbone's own output (the last [CLS] token), which k-NN reads as DINO's eval_knn.py."""

    def __init__(self, backbone, n_last_blocks=1, avgpool=False):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool
        dim = backbone.embed_dim
        self.embed_dim = dim * (n_last_blocks + avgpool)
        self.final = slice((n_last_blocks - 1) * dim, n_last_blocks * dim)
        cls = "the [CLS] token" if n_last_blocks == 1 else f"the [CLS] tokens of the last {n_last_blocks} blocks"
        self.name = cls + (" and the last block's mean patch token" if avgpool else "")
        if not isinstance(backbone, common.VisionTransformer):
            self.name = "the pooled ResNet output"

    def forward(self, x):
        if self.n_last_blocks == 1 and not self.avgpool:
            return self.backbone(x)
        blocks = self.backbone.last_block_tokens(self.backbone.embed(x), self.n_last_blocks)  # n x (B, 1 + L, D)
        parts = [tokens[:, 0] for tokens in blocks] + ([blocks[-1][:, 1:].mean(1)] if self.avgpool else [])
        return torch.cat(parts, dim=1)


def linear_head(dim, classes, bn):
    head = nn.Linear(dim, classes)
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's probe init; zero bias
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head) if bn else head


def head_optimizer(head, peak, args):
    """SGD with Nesterov momentum 0.9, or LARS (momentum 0.9, eta 0.001, the bias skips decay and trust ratio) as
    MAE's probe."""
    if args.optimizer == "lars":
        return common.LARS(head.parameters(), lr=peak, weight_decay=args.wd)
    return torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=args.wd)


def train_head(train_f, train_l, classes, lr, args, env):
    """The classifier on precomputed features: --optimizer, warmup and cosine per step, lr x B/256."""
    g = torch.Generator().manual_seed(args.seed)
    head = linear_head(train_f.shape[1], classes, args.bn_head == "on").to(env.device)
    peak = lr * args.batch / 256
    optimizer = head_optimizer(head, peak, args)
    steps_per_epoch = max(1, len(train_f) // args.batch)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_f), generator=g).to(env.device)
        idx = order[(step % steps_per_epoch) * args.batch :][: args.batch]
        common.set_lr(optimizer, common.cosine_schedule(step, total, warmup, peak))
        loss = F.cross_entropy(head(train_f[idx]), train_l[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def accuracy(head, feats, labels):
    return 100.0 * (head(feats).argmax(1) == labels).float().mean().item()


def probe_features(train_f, train_l, test_f, test_l, classes, args, env):
    lr = args.lr
    if lr is None:  # choose the lr on a held-out 10% of the training set
        order = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(args.seed)).to(env.device)
        held, fit = order[: len(order) // 10], order[len(order) // 10 :]
        scores = {
            c: accuracy(train_head(train_f[fit], train_l[fit], classes, c, args, env), train_f[held], train_l[held])
            for c in LR_GRID
        }
        lr = max(scores, key=scores.get)
        print("held-out top-1 by lr: " + ", ".join(f"{c:g}: {s:.2f}" for c, s in scores.items()))
    return accuracy(train_head(train_f, train_l, classes, lr, args, env), test_f, test_l), lr


def augmented_loader(train_set, args):
    """Batches of a random resized crop and flip of each training image (no colour), redrawn every epoch: the keys
    are (epoch, index), as in training, so call loader.sampler.set_epoch(epoch) before each epoch."""
    crop_and_flip = common.Views([common.ViewSpec(args.img_size, jitter_p=0.0, gray_p=0.0)])
    return DataLoader(
        common.Augmented(train_set, crop_and_flip.draw, args.seed),
        args.batch,
        sampler=common.EpochSampler(len(train_set), args.seed, args.batch),
        drop_last=True,
        num_workers=args.workers,
        collate_fn=crop_and_flip.collate,
    )


def probe_augmented(features, train_set, test_f, test_l, classes, args, env):
    """Linear classifier on frozen features of freshly augmented crops every epoch (BN of the backbone frozen)."""
    lr = args.lr if args.lr is not None else 0.1
    peak = lr * args.batch / 256
    loader = augmented_loader(train_set, args)
    head = linear_head(features.embed_dim, classes, args.bn_head == "on").to(env.device)
    optimizer = head_optimizer(head, peak, args)
    amp, _ = common.autocast(args, env)
    features.eval()
    total, warmup, step = args.epochs * len(loader), round(args.warmup_epochs * len(loader)), 0
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for views, label in loader:
            common.set_lr(optimizer, common.cosine_schedule(step, total, warmup, peak))
            with torch.no_grad(), amp():  # in chunks: MAE's batch of 16384 would not fit through a ViT at once
                feats = torch.cat([features(common.to_device([c], args, env)[0]) for c in views[0].split(256)]).float()
            loss = F.cross_entropy(head(feats), label.to(env.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        print(f"epoch {epoch}: loss {loss.item():.4f}")
    return accuracy(head.eval(), test_f, test_l), lr


def main(argv=None):
    args = resolve(get_args(argv))
    env = common.init(args)
    backbone = load_backbone(args).to(env.device)
    if args.arch.startswith("resnet"):
        backbone = backbone.to(memory_format=torch.channels_last)
    splits = common.labelled_splits(args, args.subset)
    if splits is None:
        raise common.UserError(
            f"{args.dataset} at {args.data} has no labelled train/ and val/ (or test/) to evaluate on"
        )
    if args.protocol == "augmented" and env.world > 1:
        raise common.UserError("--protocol augmented trains one classifier in one process; run it without torchrun")
    train_set = splits[0]
    args = argparse.Namespace(**{**vars(args), "batch": min(args.batch, len(train_set))})  # MAE's 16384 on less
    if args.bn_stats == "data":
        estimate_bn_stats(backbone, train_set, args, env)
    features = ProbedFeatures(backbone, args.n_last_blocks, args.avgpool == "on")
    train_f, train_l, test_f, test_l = common.split_features(features, splits, args, env)
    classes = int(max(train_l.max(), test_l.max())) + 1
    result = {
        "ckpt": args.ckpt,
        "arch": args.arch,
        "dataset": args.dataset,
        "img_size": args.img_size,
        "features": features.name,
        "feature_dim": features.embed_dim,
        **{name: getattr(args, name) for name in RECORDED_SETTINGS},
    }
    result.update(common.knn_accuracy(train_f[:, features.final], train_l, test_f[:, features.final], test_l))
    if args.protocol == "features":
        result["linear_top1"], result["lr"] = probe_features(train_f, train_l, test_f, test_l, classes, args, env)
    else:
        result["linear_top1"], result["lr"] = probe_augmented(features, train_set, test_f, test_l, classes, args, env)
    out = args.out or (
        os.path.join(os.path.dirname(args.ckpt), "eval.json") if args.ckpt != "random" else "eval_random.json"
    )
    common.write_json(out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    common.run(main)
