"""Frozen-backbone evaluation of any backbone.pt: a linear probe and a weighted k-NN classifier.

Usage:
    python eval_linear.py --ckpt runs/simclr/backbone.pt                   # arch, data, size from args.json beside it
    python eval_linear.py --ckpt random --arch resnet18 --dataset cifar10  # the same arch at random init: the baseline
    python eval_linear.py --ckpt runs/simclr/backbone.pt --protocol augmented --epochs 100 --lr 0.1

Protocols:
  features (default, fast): features of the center-cropped images are computed once; a linear classifier is
      trained on them with SGD (momentum 0.9, Nesterov, cosine, no weight decay) for --epochs. Without --lr, the
      learning rate is chosen from a small grid on a held-out 10% of the training set (as BYOL App. C.1), then
      the classifier is retrained on the whole training set.
  augmented: the papers' protocol, a random resized crop and flip every epoch through the frozen backbone
      (BatchNorm in inference mode); SimCLR's App. B.5 uses 90 epochs, Nesterov SGD, lr 0.1 x B/256.
  --bn-head puts BatchNorm1d(affine=False) before the linear layer (MAE's linear probe); on by default for MAE
      backbones.
k-NN: weighted cosine k-NN as DINO's eval_knn (k 20 and 200, T 0.07) on the same features.

The last line printed is a JSON object with linear_top1 and knn_top1 (%); it is also written to --out.
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
    p.add_argument("--epochs", type=int, default=100, help="linear classifier epochs")
    p.add_argument("--batch", type=int, default=256, help="linear classifier batch size")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base lr per 256 images; default: chosen on a held-out split (features) or 0.1 (augmented)",
    )
    p.add_argument("--wd", type=float, default=0.0, help="weight decay of the linear classifier")
    p.add_argument(
        "--bn-head",
        default="auto",
        choices=["auto", "on", "off"],
        help="BatchNorm(affine=False) before the classifier; auto: on for MAE",
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
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, off on CPU), bf16, fp16 or off")
    p.add_argument("--seed", type=int, default=0, help="random seed (random init, data order)")
    p.add_argument(
        "--out", default=None, help="JSON result file; default: eval.json beside the checkpoint, or eval_random.json"
    )
    return p.parse_args(argv)


def resolve(args):
    """A copy of args with the unset flags filled from the run's args.json (beside the checkpoint), then from
    defaults, and checked as the training scripts check theirs."""
    run = {}
    if args.ckpt != "random":
        if not os.path.isfile(args.ckpt):
            raise common.UserError(f"--ckpt {args.ckpt!r} does not exist; give a run's backbone.pt or 'random'")
        path = os.path.join(os.path.dirname(args.ckpt), "args.json")
        if os.path.isfile(path):
            with open(path) as f:
                run = json.load(f)
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
    method = run.get("method")
    bn_head = ("on" if method == "mae" else "off") if args.bn_head == "auto" else args.bn_head
    return common.check_args(argparse.Namespace(**{**vars(args), **filled, "method": method, "bn_head": bn_head}))


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


def linear_head(dim, classes, bn):
    head = nn.Linear(dim, classes)
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's probe init; zero bias
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head) if bn else head


def train_head(train_f, train_l, classes, lr, args, env):
    """SGD on precomputed features: Nesterov momentum 0.9, cosine schedule per step, lr x B/256."""
    g = torch.Generator().manual_seed(args.seed)
    head = linear_head(train_f.shape[1], classes, args.bn_head == "on").to(env.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    steps_per_epoch = max(1, len(train_f) // args.batch)
    for step in range(args.epochs * steps_per_epoch):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_f), generator=g).to(env.device)
        idx = order[(step % steps_per_epoch) * args.batch :][: args.batch]
        common.set_lr(optimizer, common.cosine_schedule(step, args.epochs * steps_per_epoch, 0, lr * args.batch / 256))
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


def probe_augmented(backbone, train_set, test_f, test_l, classes, args, env):
    """Linear classifier on frozen features of freshly augmented crops every epoch (BN of the backbone frozen)."""
    lr = args.lr if args.lr is not None else 0.1
    peak = lr * args.batch / 256
    crop_and_flip = common.Views([common.ViewSpec(args.img_size, jitter_p=0.0, gray_p=0.0)])  # no colour
    loader = DataLoader(
        common.Augmented(train_set, crop_and_flip.draw, args.seed),
        args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=crop_and_flip.collate,
    )
    head = linear_head(backbone.embed_dim, classes, args.bn_head == "on").to(env.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=args.wd)
    amp, _ = common.autocast(args, env)
    backbone.eval()
    total, step = args.epochs * len(loader), 0
    for epoch in range(args.epochs):
        for views, label in loader:
            common.set_lr(optimizer, common.cosine_schedule(step, total, 0, peak))
            with torch.no_grad(), amp():
                feats = backbone(common.to_device(views, args, env)[0]).float()
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
    train_set = splits[0]
    if args.bn_stats == "data":
        estimate_bn_stats(backbone, train_set, args, env)
    train_f, train_l, test_f, test_l = common.split_features(backbone, splits, args, env)
    classes = int(max(train_l.max(), test_l.max())) + 1
    result = {
        "ckpt": args.ckpt,
        "arch": args.arch,
        "dataset": args.dataset,
        "img_size": args.img_size,
        "protocol": args.protocol,
        "bn_stats": args.bn_stats,
    }
    result.update(common.knn_accuracy(train_f, train_l, test_f, test_l))
    if args.protocol == "features":
        result["linear_top1"], result["lr"] = probe_features(train_f, train_l, test_f, test_l, classes, args, env)
    else:
        result["linear_top1"], result["lr"] = probe_augmented(backbone, train_set, test_f, test_l, classes, args, env)
    out = args.out or (
        os.path.join(os.path.dirname(args.ckpt), "eval.json") if args.ckpt != "random" else "eval_random.json"
    )
    common.write_json(out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    common.run(main)
