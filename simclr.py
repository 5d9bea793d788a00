"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Ting Chen, Simon Kornblith, Mohammad Norouzi, Geoffrey Hinton, ICML 2020. https://arxiv.org/abs/2002.05709

Two augmented views of each image go through the same encoder and a small MLP projector. The NT-Xent loss
pulls each view's embedding towards its partner and pushes it away from the other 2N-2 views of the batch
(cosine similarity, temperature tau). Negatives come from the whole global batch: embeddings are gathered
from all processes with gradient, and BatchNorm is synchronised across GPUs so positives cannot cheat.
Strong colour distortion is essential. After training the projector is thrown away and the encoder is kept.

Usage:
    python simclr.py --dataset synthetic --arch resnet18 --batch 128 --epochs 5        # CPU demo
    torchrun --nproc_per_node=8 simclr.py --dataset imagenet --data /data/imagenet --batch 4096
    python simclr.py --dataset cifar10 --arch resnet50 --batch 1024 --epochs 1000 --lr 1.0 \\
        --temperature 0.5 --aug simclr-cifar                      # paper App. B.9 (colour 0.5, no blur)
    python eval_linear.py --ckpt runs/simclr/backbone.pt

Defaults are the paper's ImageNet recipe: ResNet-50, LARS, lr 0.3 x B/256, wd 1e-6, temperature 0.1, batch
4096, 10 warmup epochs then cosine, projector 2048-2048-128 with BatchNorm after every layer (the official
code; the paper's text omits the BN), colour strength 1 with blur.
Differences from the official TF code: it sums the two directions' losses (2x the paper's 1/2N mean, which
only matters for LARS-excluded parameters); we use the paper's mean. Its wd default is 1e-4 (SimCLRv2).

Reference numbers (ImageNet linear top-1, ResNet-50): 100 epochs 64.5 (paper Table 1, B=4096);
1000 epochs 69.3 (paper Table 6); the released v1 checkpoint evaluates to 69.1. CIFAR-10: 94.0 with a
ResNet-50 after 1000 epochs (paper App. B.9); ~91 with a ResNet-18 (official README).
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "simclr"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--dataset", default="synthetic", help="cifar10, cifar100, stl10, imagenet, folder or synthetic")
    p.add_argument("--data", default=None, help="data root (folder/imagenet: holds train/ and val/ or test/)")
    p.add_argument("--stem", default="auto", choices=["auto", "cifar", "imagenet"], help="ResNet stem; auto: CIFAR stem at 64 px and below")
    p.add_argument("--img-size", type=int, default=None, help="training crop size; default: the dataset's native size")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size; default 16 (4 at 64 px and below, 8 below 160)")
    p.add_argument("--workers", type=int, default=8, help="data loading processes per training process")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, off on CPU), bf16, fp16 or off")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--subset", type=int, default=0, help="train on a fixed random subset of N images (0: all)")
    p.add_argument("--knn-every", type=int, default=10, help="k-NN monitor every E epochs and at the end (0: never)")
    p.add_argument("--log-every", type=int, default=50, help="write log.jsonl every N steps")
    p.add_argument("--out", default=f"runs/{METHOD}", help="output folder; rerunning with the same folder resumes")
    # method
    p.add_argument("--arch", default="resnet50", help="resnet18, resnet50, vit_tiny, vit_small or vit_base")
    p.add_argument("--epochs", type=int, default=100, help="training epochs (the paper's best models: 1000)")
    p.add_argument("--batch", type=int, default=4096, help="global batch size, summed over processes")
    p.add_argument("--optimizer", default="lars", help="lars, sgd or adamw")
    p.add_argument("--lr", type=float, default=0.3, help="base learning rate per 256 images")
    p.add_argument("--wd", type=float, default=1e-6, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs")
    p.add_argument("--aug", default="auto", help="augmentation recipe from common.RECIPES; auto: simclr, or simclr-cifar at 64 px and below")
    p.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature (CIFAR: 0.5)")
    p.add_argument("--proj-hidden", type=int, default=0, help="projector hidden width (0: the backbone's width)")
    p.add_argument("--proj-dim", type=int, default=128, help="projector output width")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Method


def nt_xent(z1, z2, temperature):
    """NT-Xent over the 2N views of the global batch, averaged over this process's 2n anchors.
    z1, z2: (n, d) embeddings of the two views of this process's images."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d) local anchors
    keys = torch.cat([common.gather(z[:n]), common.gather(z[n:])])  # (2N, d): all first views, then all second
    N = keys.shape[0] // 2
    mine = torch.arange(n, device=z.device) + common.rank() * n  # our images' global indices
    self_idx, pos_idx = torch.cat([mine, mine + N]), torch.cat([mine + N, mine])
    logits = (z @ keys.T / temperature).scatter(1, self_idx[:, None], float("-inf"))  # a view is not its own negative
    return F.cross_entropy(logits, pos_idx)


def projector(in_dim, hidden, out_dim):
    """The official code's head: every linear layer followed by BN; the last BN has no bias (beta)."""
    head = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim, bias=False), nn.BatchNorm1d(out_dim))
    head[-1].bias.requires_grad_(False)
    return head


class SimCLR(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args)
        dim = self.backbone.embed_dim
        self.projector = projector(dim, args.proj_hidden or dim, args.proj_dim)
        self.temperature = args.temperature

    def forward(self, views):
        # Both views in one pass, as the official code: BN statistics cover the 2n views together.
        z1, z2 = self.projector(self.backbone(torch.cat(views))).chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        return loss, {}


# ----------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = get_args(argv)
    env = common.init(args, METHOD)
    args.aug = {"auto": "simclr-cifar" if args.img_size <= 64 else "simclr"}.get(args.aug, args.aug)  # METHOD:
    augment = common.make_views(args.aug, args.img_size)
    loader = common.train_loader(args, env, augment)
    net = SimCLR(args).to(env.device)
    model = common.distribute(net, args, env)
    optimizer = common.build_optimizer(args, env, net)
    amp, scaler = common.autocast(args, env)
    start_epoch, step = common.resume(args, env, net, optimizer, scaler)
    steps_per_epoch, total_steps = len(loader), args.epochs * len(loader)
    dummy = [torch.zeros(env.local_batch, 3, s, s, device=env.device) for s in augment.sizes]
    flops = common.count_step_flops(net, common.to_device(dummy, args, env)) * env.world
    log = common.TrainLog(args, env, flops, steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        for views, _ in log.epoch(loader, epoch):
            lr = common.cosine_schedule(step, total_steps, args.warmup_epochs * steps_per_epoch, env.lr)
            common.set_lr(optimizer, lr)
            views = common.to_device(views, args, env)
            with amp():
                loss, scalars = model(views)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            log.step(epoch, step, lr, loss, scalars)
        last = epoch + 1 == args.epochs
        knn = common.knn_eval(net.backbone, args, env) if args.knn_every and ((epoch + 1) % args.knn_every == 0 or last) else None
        log.write({"epoch": epoch, "step": step, "flops": step * flops, **(knn or {})})
        if env.main and knn:
            print(f"epoch {epoch}: k-NN top-1 {knn['knn_top1']:.2f}")
        common.save_checkpoint(args, env, epoch, step, net, optimizer, scaler)


if __name__ == "__main__":
    common.run(main)
