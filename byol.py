"""BYOL: Bootstrap Your Own Latent, a New Approach to Self-Supervised Learning.
Jean-Bastien Grill, Florian Strub, Florent Altche, et al. NeurIPS 2020. https://arxiv.org/abs/2006.07733

An online encoder, projector and predictor predict from one view the target network's projection of the other
view (2 - 2 cos, symmetrised). The target is an EMA of the online encoder and projector and gets no gradient.

CPU demo: 4 min on 2 cores (AVX2, fp32), a quarter-width ResNet-18 with the CIFAR stem and torchvision's init; the
k-NN monitor reads 31.3 after 3 epochs and 31.2 after 6, against 15.6 for the same network at random init with
BatchNorm statistics of the data (eval_linear.py --ckpt random --bn-stats data; 34.5 with its initial statistics,
which normalise nothing). With the default zero-initialised residuals this short run reads 28.9 and 27.8:
    python byol.py --dataset synthetic --arch resnet18 --width 0.25 --stem cifar --batch 64 --epochs 6 \\
        --optimizer sgd --lr 0.3 --wd 5e-4 --warmup-epochs 1 --aug simclr-cifar --mlp 1024-256 --ema 0.9 \\
        --zero-init-residual 0 --workers 2 --knn-every 3

Usage:
    torchrun --nproc_per_node=8 byol.py --dataset imagenet --data /data/imagenet --batch 4096
    python byol.py --dataset cifar10 --arch resnet18 --batch 256 --epochs 1000 --lr 1.0 --wd 1e-5 --ema 0.99 \\
        --lars-eta 0.02 --lars-clip 1 --aug byol-cifar --zero-init-residual 0  # solo-learn's CIFAR-10 config
    python eval_linear.py --ckpt runs/byol/backbone.pt

solo-learn's CIFAR-10 config (scripts/pretrain/cifar/byol.yaml): its README reports 92.58 top-1, most likely from its
online linear classifier. The command above sets every flag of that config. These departures are not flags: its CIFAR
stem pads the 3x3 conv by 2 (here 1); its heads' linear layers all have biases; its warmup starts at 3e-5 (here 0);
its LARS divides by ||g|| + wd*||p|| (here ||g + wd*p||, see common.LARS); it normalises with CIFAR's mean and
std (here ImageNet's); its target starts as a copy of the online network (here its own random init).

Defaults: the paper's ImageNet recipe: ResNet-50, projector and predictor 4096-256, LARS lr 0.2 x B/256, wd
1.5e-6, batch 4096, 1000 epochs, 10 warmup, cosine, EMA 0.996 -> 1; the last BatchNorm of every residual block
starts at zero, as the released code (its README: more stable training; the paper's numbers used 1, which is
--zero-init-residual 0). Official presets: 300 epochs lr 0.3 wd 1e-6 --ema 0.99; 100 epochs lr 0.45 wd 1e-6
--ema 0.99. ImageNet linear top-1 of a ResNet-50: 74.3 after 1000 epochs (paper Table 1), 72.5 after 300
(Table 5), 69.3 after 100 (VICReg's re-implementation, its App. C.4).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import common

METHOD = "byol"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    # run
    p.add_argument("--dataset", default="synthetic", help="cifar10, cifar100, stl10, imagenet, folder or synthetic")
    p.add_argument("--data", default=None, help="data root (folder/imagenet: holds train/ and val/ or test/)")
    p.add_argument("--stem", default="auto", help="ResNet stem: auto (CIFAR stem at 64 px and below), cifar, imagenet")
    p.add_argument("--img-size", type=int, default=None, help="training crop size; default: the dataset's native size")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size; default 16, 8 below 160 px, 4 at 64")
    p.add_argument("--workers", type=int, default=8, help="data loading processes per training process")
    p.add_argument("--gpu-aug", action="store_true", help="augment on the training device (workers only decode)")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA and native-bf16 CPUs, else off), bf16, fp16, off")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--subset", type=int, default=0, help="train on a fixed random subset of N images (0: all)")
    p.add_argument("--knn-every", type=int, default=10, help="k-NN monitor every E epochs and at the end (0: never)")
    p.add_argument("--log-every", type=int, default=50, help="write log.jsonl every N steps")
    p.add_argument(
        "--online-probe",
        type=int,
        default=1,
        choices=[0, 1],
        help="1: train a linear classifier on the detached features alongside, when the data set has labels",
    )
    p.add_argument(
        "--ckpt-every", type=int, default=0, help="also write the checkpoint every N steps (0: at epoch ends only)"
    )
    p.add_argument(
        "--budget-flops", type=float, default=0, help="train for this many FLOPs instead of --epochs (0: off)"
    )
    p.add_argument("--lars-eta", type=float, default=0.001, help="LARS trust coefficient (solo-learn's LARS: 0.02)")
    p.add_argument(
        "--lars-clip", type=int, default=0, choices=[0, 1], help="1: cap each layer's LARS rate at the lr (solo-learn)"
    )
    p.add_argument(
        "--zero-init-residual",
        type=int,
        default=1,
        choices=[0, 1],
        help="ResNets: start the last BatchNorm of every residual block at zero (the official SimCLR, BYOL, VICReg)",
    )
    p.add_argument("--out", default=f"runs/{METHOD}", help="output folder; rerunning with the same folder resumes")
    p.set_defaults(method=METHOD)
    # method
    p.add_argument("--arch", default="resnet50", help="resnet18, resnet50, vit_tiny, vit_small or vit_base")
    p.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier (SimCLR's 2x, 4x)")
    p.add_argument("--epochs", type=int, default=1000, help="training epochs")
    p.add_argument("--batch", type=int, default=4096, help="global batch size, summed over processes")
    p.add_argument("--optimizer", default="lars", help="lars, sgd or adamw")
    p.add_argument("--lr", type=float, default=0.2, help="base learning rate per 256 images")
    p.add_argument("--wd", type=float, default=1.5e-6, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs")
    p.add_argument("--aug", default="byol", help="augmentation recipe (common.RECIPES)")
    p.add_argument("--ema", type=float, default=0.996, help="target EMA momentum, cosine to 1 (0: SimSiam's form)")
    p.add_argument("--predictor", type=int, default=1, choices=[0, 1], help="0: no predictor (an ablation)")
    p.add_argument("--mlp", default="4096-256", help="projector and predictor widths (the last is the embedding)")
    return common.parse_args(p, argv)


# ----------------------------------------------------------------------------------------------------------
# Method


def byol_loss(p1, p2, z1, z2):
    """Mean over the batch of (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)); no gradient reaches the targets z."""
    cos_12 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=1)
    cos_21 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=1)
    return (2 - 2 * cos_12 + 2 - 2 * cos_21).mean()


def mlp(in_dim, widths):
    """The official code's head: (Linear, BN, ReLU) per hidden width, then the output layer."""
    layers = []
    for width in widths[:-1]:
        layers += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_dim = width
    layers += [nn.Linear(in_dim, widths[-1], bias=False)]
    return nn.Sequential(*layers)


class BYOL(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args)
        dim = self.backbone.embed_dim
        self.projector = mlp(dim, [int(w) for w in args.mlp.split("-")])
        predictor = mlp(int(args.mlp.split("-")[-1]), [int(w) for w in args.mlp.split("-")])
        self.predictor = predictor if args.predictor else nn.Identity()
        self.target = None  # --ema 0: the online network is its own target
        if args.ema:
            self.target = nn.Sequential(common.build_backbone(args), mlp(dim, [int(w) for w in args.mlp.split("-")]))
            self.target.requires_grad_(False)  # its own random init (the official code), then an EMA; BN buffers too

    def forward(self, views):
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.target is not None:
            with torch.no_grad():
                z1, z2 = (self.target(v) for v in views)
        loss = byol_loss(p1, p2, z1, z2)  # the targets z under stop-gradient
        return loss, {}


# ----------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = get_args(argv)
    env = common.init(args, args.out)
    peak_lr = common.scaled_lr(args, env)
    augment = common.make_views(args.aug, args.img_size)
    loader = common.train_loader(args, env, augment)
    net = BYOL(args).to(env.device)  # METHOD: the model
    backbone = net.backbone  # what the run is for: backbone.pt and the k-NN monitor
    model = common.distribute(net, args, env)
    optimizer = common.build_optimizer(args, env, net, peak_lr)
    amp, scaler = common.autocast(args, env)
    flops = common.count_step_flops(net, augment.sizes, args, env)
    steps_per_epoch = len(loader)
    total_steps = common.training_steps(args, steps_per_epoch, flops)
    epochs = math.ceil(total_steps / steps_per_epoch)
    probe = common.OnlineProbe(backbone, args, env, total_steps)  # a linear classifier on detached features
    start_epoch, step, saved_log = common.resume(args, env, net, optimizer, scaler, steps_per_epoch, probe)
    common.write_args(args, env)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    log = common.TrainLog(args, env, flops, step, saved_log)
    preemption = common.Preemption(args, env, steps_per_epoch, total_steps)
    for epoch in range(start_epoch, epochs):
        model.train()
        # the shuffle and every augmentation: functions of (seed, epoch, index); a resumed epoch skips what it trained
        loader.sampler.set_epoch(epoch, skip_batches=step - epoch * steps_per_epoch)
        for views, labels in log.progress(loader, epoch):
            lr = common.cosine_schedule(step, total_steps, warmup_steps, peak_lr)
            common.set_lr(optimizer, lr)
            if args.gpu_aug:  # the workers only decoded: crops, colour and blur run on the training device
                views = augment.render_on_device(views, env.device)
            views = common.to_device(views, args, env)
            with amp():
                loss, scalars = model(views)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            tau = 1 - common.cosine_schedule(step, total_steps, 0, 1 - args.ema)  # METHOD: EMA momentum 0.996 -> 1
            if net.target is not None:  # METHOD:
                common.ema_update(net.target, [net.backbone, net.projector], tau)  # METHOD:
            online = probe.step(views, labels, step)  # trains on this step's features; the backbone never sees it
            step += 1
            log.add(loss, scalars, online)
            if step % args.log_every == 0 or step % steps_per_epoch == 0 or step == total_steps:
                mean_loss = log.write_interval(epoch, step, lr)  # the loop's only host sync
                common.check_finite(mean_loss, step)
            if step == total_steps:  # the last step a --budget-flops run pays for
                break
            if preemption.checkpoint_due(step):  # every --ckpt-every steps, and after SIGTERM or SIGUSR1
                common.save_checkpoint(
                    args, env, epoch, step, net, optimizer, scaler, backbone, log, steps_per_epoch, probe
                )
                preemption.stop_if_signalled(step)
        knn = common.knn_monitor(backbone, args, env, epoch, epochs, probe)
        log.write({"epoch": epoch, "step": step, "flops": step * flops, **knn})
        # a resume starts the next epoch
        common.save_checkpoint(
            args, env, epoch + 1, step, net, optimizer, scaler, backbone, log, steps_per_epoch, probe
        )
        preemption.stop_if_signalled(step)
    log.finish(step)


if __name__ == "__main__":
    common.run(main)
