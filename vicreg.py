"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning.
Adrien Bardes, Jean Ponce, Yann LeCun. ICLR 2022. https://arxiv.org/abs/2105.04906

Two views pass through one encoder and a wide expander. The loss keeps the embeddings of the two views close,
every dimension's std over the batch above 1, and the dimensions decorrelated. No negatives, no target.
Normalised as the official code: invariance = F.mse_loss (a mean over the batch and the d dimensions) on this
process's batch; per branch, on the batch gathered over the processes and centred, the variance term is
relu(1 - sqrt(var + 1e-4)) averaged over the dimensions and halved, and the covariance term is the squared
off-diagonal entries of X^T X / (n - 1), summed and divided by d. Garrido et al. 2023's duals: --variant exp
repels each covariance row through LogSumExp(c / --temperature) over its off-diagonal entries (their Eq. 11),
and --variant ctr is exp on the transposed batch, so that the statistics run over the dimensions.

CPU demo: 3 min on 2 cores (AVX2, fp32), a quarter-width ResNet-18 with the CIFAR stem; the k-NN monitor reads
28.3 after 3 epochs and 31.5 after 6, against 15.6 for the same network at random init with BatchNorm statistics
of the data (eval_linear.py --ckpt random --bn-stats data; 34.5 with its initial statistics, which normalise
nothing). With torchvision's init (--zero-init-residual 0) the same run reads 23.3 and 23.6:
    python vicreg.py --dataset synthetic --arch resnet18 --width 0.25 --stem cifar --batch 64 --epochs 6 \\
        --optimizer sgd --lr 0.3 --wd 5e-4 --warmup-epochs 1 --aug simclr-cifar --mlp 1024-1024-1024 \\
        --workers 2 --knn-every 3

Usage:
    torchrun --nproc_per_node=8 vicreg.py --dataset imagenet --data /data/imagenet --batch 2048
    python vicreg.py --dataset cifar10 --arch resnet18 --batch 256 --epochs 1000 --lr 0.3 --wd 1e-4 \\
        --mlp 2048-2048-2048 --std-coeff 50 --lars-eta 0.02 --lars-clip 1 --aug vicreg-cifar \\
        --zero-init-residual 0                         # solo-learn's CIFAR-10 config
    python eval_linear.py --ckpt runs/vicreg/backbone.pt

solo-learn's CIFAR-10 config (scripts/pretrain/cifar/vicreg.yaml): its README reports 92.07 top-1, most likely from its
online linear classifier. The command above sets every flag of that config; --std-coeff 50 is its 25, because its
variance term sums the two branches without halving them. These departures are not flags: its lr falls to 0 (here
to peak/1000, the official code); its CIFAR stem pads the 3x3 conv by 2 (here 1); its expander's last layer has a
bias; its warmup starts at 3e-5 (here 0); its LARS divides by ||g|| + wd*||p|| (here ||g + wd*p||, see
common.LARS); it normalises with CIFAR's mean and std (here ImageNet's).

Defaults: the paper's ImageNet recipe: ResNet-50, expander 8192-8192-8192, LARS lr 0.2 x B/256, wd 1e-6,
batch 2048, 1000 epochs (100-epoch ablations: lr 0.3), 10 warmup, cosine to peak/1000, coefficients 25/25/1,
BYOL's asymmetric augmentations as the official code (the paper's symmetric set: --aug vicreg-symmetric).
ImageNet linear top-1 of a ResNet-50: 73.2 after 1000 epochs (Table 1), 68.6 after 100 (Table 4).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import common

METHOD = "vicreg"


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
    p.add_argument("--batch", type=int, default=2048, help="global batch size, summed over processes")
    p.add_argument("--optimizer", default="lars", help="lars, sgd or adamw")
    p.add_argument("--lr", type=float, default=0.2, help="base learning rate per 256 images")
    p.add_argument("--wd", type=float, default=1e-6, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs")
    p.add_argument("--aug", default="byol", help="augmentation recipe (common.RECIPES); the paper's: vicreg-symmetric")
    p.add_argument("--mlp", default="8192-8192-8192", help="expander widths (the last is the embedding)")
    p.add_argument("--sim-coeff", type=float, default=25.0, help="invariance coefficient (lambda)")
    p.add_argument("--std-coeff", type=float, default=25.0, help="variance coefficient (mu)")
    p.add_argument("--cov-coeff", type=float, default=1.0, help="covariance coefficient (nu)")
    p.add_argument("--variant", default="vicreg", choices=["vicreg", "exp", "ctr"], help="Garrido et al. 2023")
    p.add_argument("--temperature", type=float, default=0.1, help="temperature of VICReg-exp and VICReg-ctr")
    return common.parse_args(p, argv)


# ----------------------------------------------------------------------------------------------------------
# Method


def off_diagonal_squares(cov):
    """VICReg's covariance penalty: the squared off-diagonal entries, summed."""
    return cov.square().sum() - torch.diagonal(cov).square().sum()


def off_diagonal_logsumexp(cov, temperature):
    """VICReg-exp's (Garrido et al. 2023, Eq. 11): LogSumExp(c / temperature) over each row's off-diagonal, summed."""
    return (cov / temperature).fill_diagonal_(float("-inf")).logsumexp(1).sum()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, variant="vicreg", temperature=0.1):
    """sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, normalised as the official code (see
    the docstring above); variants exp and ctr (exp on the transposed batch) as Garrido et al. 2023."""
    loss = sim_coeff * F.mse_loss(z1.float(), z2.float())  # invariance, on this process's batch
    for z in (z1, z2):  # variance and covariance of each branch, on the gathered, centred batch
        x = common.gather(z.float()).T if variant == "ctr" else common.gather(z.float())
        x = x - x.mean(0)  # (n, d)
        cov = x.T @ x / (len(x) - 1)
        repel = off_diagonal_squares(cov) if variant == "vicreg" else off_diagonal_logsumexp(cov, temperature)
        loss = loss + std_coeff * F.relu(1 - (x.var(0) + 1e-4).sqrt()).mean() / 2 + cov_coeff * repel / x.shape[1]
    return loss


def mlp(in_dim, widths):
    """The official code's head: (Linear, BN, ReLU) per hidden width, then the output layer."""
    layers = []
    for width in widths[:-1]:
        layers += [nn.Linear(in_dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_dim = width
    layers += [nn.Linear(in_dim, widths[-1], bias=False)]
    return nn.Sequential(*layers)


class VICReg(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args)
        dim = self.backbone.embed_dim
        self.projector = mlp(dim, [int(w) for w in args.mlp.split("-")])
        self.args = args

    def forward(self, views):
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        a = self.args
        loss = vicreg_loss(z1, z2, a.sim_coeff, a.std_coeff, a.cov_coeff, a.variant, a.temperature)
        return loss, {}


# ----------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = get_args(argv)
    env = common.init(args, args.out)
    peak_lr = common.scaled_lr(args, env)
    augment = common.make_views(args.aug, args.img_size)
    loader = common.train_loader(args, env, augment)
    net = VICReg(args).to(env.device)  # METHOD: the model
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
            lr = common.cosine_schedule(step, total_steps, warmup_steps, peak_lr, peak_lr / 1000)  # METHOD:
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
