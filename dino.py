"""DINO: Emerging Properties in Self-Supervised Vision Transformers.
Mathilde Caron, Hugo Touvron, Ishan Misra, et al. ICCV 2021. https://arxiv.org/abs/2104.14294

A student sees 2 global and several local crops; a teacher (an EMA of the student, no gradient) sees the 2
global crops. The student matches the teacher's centred, sharpened softmax over K prototypes on other crops.

CPU demo: 12 min on 2 cores (AVX2, fp32, partly shared), a quarter-width ResNet-18 with the CIFAR stem and the
BatchNorm head; the k-NN monitor reads 26.2 after 3 epochs and 25.1 after 6, against 15.6 for the same network at
random init with BatchNorm statistics of the data (eval_linear.py --ckpt random --bn-stats data; 34.5 with its
initial statistics, which normalise nothing):
    python dino.py --dataset synthetic --arch resnet18 --width 0.25 --stem cifar --batch 64 --epochs 6 \\
        --optimizer sgd --lr 0.3 --wd 5e-4 --wd-end 5e-4 --warmup-epochs 1 --aug simclr-cifar --bn-in-head 1 \\
        --local-crops 0 --out-dim 256 --ema 0.9 --workers 2 --knn-every 3

Usage:
    torchrun --nproc_per_node=8 dino.py --dataset imagenet --data /data/imagenet --batch 1024
    python dino.py --dataset cifar10 --arch vit_tiny --batch 256 --local-crops 0 --out-dim 4096 --ema 0.9995 \\
        --aug dino-resnet                              # CIFAR: no local crops, so global crops of 0.14-1
    python eval_linear.py --ckpt runs/dino/backbone.pt # ViT-S: the last 4 blocks' [CLS] tokens, as the official probe
ResNet-50 as the official README's command (8 GPUs x 64 images; the teacher temperature is the code's default,
0.04 flat):
    torchrun --nproc_per_node=8 dino.py --dataset imagenet --data /data/imagenet --arch resnet50 --batch 512 \\
        --optimizer sgd --lr 0.03 --wd 1e-4 --wd-end 1e-4 --aug dino-resnet --teacher-temp 0.04 \\
        --warmup-teacher-temp-epochs 0
Without local crops the official help advises global crops of 0.14-1 (--aug dino-resnet: its global crops).

Defaults: the paper's ViT-S/16 recipe: drop-path 0.1, head 2048-2048-256 + K=65536, AdamW lr 0.0005 x B/256 to
1e-6, wd 0.04 -> 0.4, batch 1024, 100 epochs, 10 warmup, EMA 0.996 -> 1, 8 local crops, temperatures 0.1 and
0.04 -> 0.07 over 30 epochs (the paper; the official code's default: 0.04 flat), gradients clipped at 3 per
tensor, last layer frozen in epoch 0. ResNets keep torchvision's init (no zero-initialised residuals, as the
official code). Exported: the teacher.
Reference numbers, ImageNet ViT-S/16, k-NN / linear (the official README; the linear probe reads the last 4 blocks'
[CLS] tokens): 100 epochs with the official code's defaults on 8 GPUs (--batch 512 --teacher-temp 0.04
--warmup-teacher-temp-epochs 0): 69.3 / 74.0; 300 epochs on 16 GPUs (--batch 1024 --teacher-temp 0.07
--warmup-teacher-temp-epochs 30 --norm-last-layer 0): 73.3 / 76.0; the released 800-epoch model: 74.5 / 77.0
(paper Table 2); the released ResNet-50: 67.5 / 75.3.
Departures from the official code: its blur and solarize are PIL's; its local crops are 96 px at 224 (here 96/224
of --img-size, rounded to the patch); it trains in fp16 with a GradScaler by default (here bf16 on CUDA).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import common

METHOD = "dino"


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
    p.add_argument("--arch", default="vit_small", help="resnet18, resnet50, vit_tiny, vit_small or vit_base")
    p.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier (SimCLR's 2x, 4x)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch", type=int, default=1024, help="global batch size, summed over processes")
    p.add_argument("--optimizer", default="adamw", help="lars, sgd or adamw")
    p.add_argument("--lr", type=float, default=0.0005, help="base learning rate per 256 images")
    p.add_argument("--wd", type=float, default=0.04, help="weight decay at the start (cosine to --wd-end)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs")
    p.add_argument("--aug", default="dino", help="augmentation recipe (common.RECIPES); ResNets: dino-resnet")
    p.add_argument("--ema", type=float, default=0.996, help="base target EMA momentum, raised to 1 by a cosine")
    p.add_argument("--mlp", default="2048-2048-256", help="head widths before the prototypes (the last: bottleneck)")
    p.add_argument("--out-dim", type=int, default=65536, help="K, the number of prototypes")
    p.add_argument("--wd-end", type=float, default=0.4, help="weight decay at the end")
    p.add_argument("--local-crops", type=int, default=8, help="number of local crops (side: 96/224 of --img-size)")
    p.add_argument("--norm-last-layer", type=int, default=1, help="1: freeze the last layer's weight norm at 1")
    p.add_argument("--bn-in-head", type=int, default=0, help="1: BatchNorm in the head (the official use_bn_in_head)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the student ViT")
    p.add_argument("--student-temp", type=float, default=0.1, help="student temperature")
    p.add_argument("--teacher-temp", type=float, default=0.07, help="teacher temperature after the warmup")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=30, help="epochs of the linear warmup")
    p.add_argument("--center-momentum", type=float, default=0.9, help="momentum of the teacher's center")
    p.add_argument("--clip-grad", type=float, default=3.0, help="clip each parameter's gradient norm (0: off)")
    p.add_argument("--freeze-last-layer", type=int, default=1, help="epochs during which the last layer is frozen")
    p.set_defaults(zero_init_residual=0)  # ResNets keep torchvision's init, as DINO's official code
    return common.parse_args(p, argv)


# ----------------------------------------------------------------------------------------------------------
# Method


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """Cross-entropy of the student's softmax on each crop against the teacher's centred, sharpened one on each
    other global crop: batch means, averaged over the pairs. student_out (V*B, K) crop-major, teacher_out (2*B, K)."""
    teacher = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(2)
    student = F.log_softmax(student_out.float() / student_temp, dim=-1).split(len(teacher[0]))
    pairs = [(t, s) for i, t in enumerate(teacher) for j, s in enumerate(student) if i != j]
    return sum((-t * s).sum(-1).mean() for t, s in pairs) / len(pairs)


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """momentum * center + (1 - momentum) * the mean of the teacher's outputs over the global batch."""
    total = common.gather(teacher_out.float().sum(0, keepdim=True)).sum(0)  # summed over the processes
    return momentum * center + (1 - momentum) * total / (len(teacher_out) * common.world_size())


def teacher_temperature(args, epoch):
    """Per epoch: linear from --warmup-teacher-temp to --teacher-temp over the warmup (the official linspace)."""
    start, end, epochs = args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs
    return end if epoch >= epochs else start + (end - start) * epoch / max(1, epochs - 1)


def mlp(in_dim, widths, bn=False):
    """The official code's head: (Linear, BN if --bn-in-head, GELU) per hidden width, then the output layer."""
    layers = []
    for width in widths[:-1]:
        layers += [nn.Linear(in_dim, width), *([nn.BatchNorm1d(width)] if bn else []), nn.GELU()]
        in_dim = width
    layers += [nn.Linear(in_dim, widths[-1])]
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """mlp to the bottleneck, L2 normalisation, then a weight-normalised Linear to K prototypes without bias."""

    def __init__(self, in_dim, args):
        super().__init__()
        self.mlp = mlp(in_dim, [int(w) for w in args.mlp.split("-")], args.bn_in_head)
        for layer in [m for m in self.mlp if isinstance(m, nn.Linear)]:  # the official init
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(layer.out_features, args.out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)  # each prototype's norm g: 1,
        self.last_layer.parametrizations.weight.original0.requires_grad_(not args.norm_last_layer)  # frozen by default

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args, drop_path=args.drop_path)
        dim = self.backbone.embed_dim
        self.head = DINOHead(dim, args)
        self.teacher = nn.Sequential(common.build_backbone(args), DINOHead(dim, args))
        self.teacher.load_state_dict(nn.Sequential(self.backbone, self.head).state_dict())  # a copy of the student
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, args.out_dim))
        self.args, self.teacher_temp = args, args.warmup_teacher_temp

    def forward(self, views):
        crops = [torch.cat(views[:2])] + ([torch.cat(views[2:])] if len(views) > 2 else [])  # one pass per resolution
        student = self.head(torch.cat([self.backbone(c) for c in crops]))  # (V*B, K)
        with torch.no_grad():
            teacher = self.teacher(crops[0])  # (2*B, K)
        loss = dino_loss(student, teacher, self.center, self.args.student_temp, self.teacher_temp)
        self.center.copy_(update_center(self.center, teacher, self.args.center_momentum))
        return loss, {"teacher_temp": self.teacher_temp}


# ----------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = get_args(argv)
    env = common.init(args, args.out)
    peak_lr = common.scaled_lr(args, env)
    augment = common.make_views(args.aug, args.img_size, 0, args.local_crops, args.patch_size)  # METHOD: all crops
    loader = common.train_loader(args, env, augment)
    net = DINO(args).to(env.device)  # METHOD: the model
    backbone = net.teacher[0]  # METHOD: the teacher's backbone is the result
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
        net.teacher_temp = teacher_temperature(args, epoch)  # METHOD:
        for views, labels in log.progress(loader, epoch):
            lr = common.cosine_schedule(step, total_steps, warmup_steps, peak_lr, 1e-6)  # METHOD: min lr 1e-6
            wd = common.cosine_schedule(step, total_steps, 0, args.wd, args.wd_end)  # METHOD: 0.04 -> 0.4
            optimizer.param_groups[0]["weight_decay"] = wd  # METHOD: group 0 holds the decayed weights
            common.set_lr(optimizer, lr)
            if args.gpu_aug:  # the workers only decoded: crops, colour and blur run on the training device
                views = augment.render_on_device(views, env.device)
            views = common.to_device(views, args, env)
            with amp():
                loss, scalars = model(views)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # METHOD: clip the true gradients
            if args.clip_grad:  # METHOD: each tensor on its own, as the official code
                for p in net.parameters():  # METHOD:
                    torch.nn.utils.clip_grad_norm_(p, args.clip_grad)  # METHOD:
            if epoch < args.freeze_last_layer:  # METHOD: the last layer learns from epoch 1 on
                net.head.last_layer.zero_grad(set_to_none=True)  # METHOD:
            scaler.step(optimizer)
            scaler.update()
            tau = 1 - common.cosine_schedule(step, total_steps, 0, 1 - args.ema)  # METHOD: EMA momentum 0.996 -> 1
            common.ema_update(net.teacher, [net.backbone, net.head], tau)  # METHOD:
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
