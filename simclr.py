"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Ting Chen, Simon Kornblith, Mohammad Norouzi, Geoffrey Hinton. ICML 2020. https://arxiv.org/abs/2002.05709

Two views of each image pass through one encoder and an MLP projector. NT-Xent pulls each view towards its
partner and away from the other 2N-2 views of the global batch (cosine similarity / temperature).

CPU demo: 4.4 min on 2 cores (AVX2, fp32); the k-NN monitor reads 51.0 at the end, against 30.9 for the same
network at random init (26.7 with BatchNorm statistics of the data: eval_linear.py --ckpt random --bn-stats data):
    python simclr.py --dataset synthetic --arch resnet18 --stem imagenet --batch 64 --epochs 5 --optimizer adamw \\
        --lr 2e-3 --wd 1e-4 --temperature 0.2 --warmup-epochs 1 --aug simclr --workers 2 --knn-every 5

Usage:
    torchrun --nproc_per_node=8 simclr.py --dataset imagenet --data /data/imagenet --batch 4096
    python simclr.py --dataset cifar10 --arch resnet50 --batch 1024 --epochs 1000 --lr 1.0 --temperature 0.5 \\
        --aug simclr-cifar                             # the paper's App. B.9: colour strength 0.5, no blur
    python eval_linear.py --ckpt runs/simclr/backbone.pt

Defaults: the paper's ImageNet recipe: ResNet-50, projector 2048-2048-128 with BN after every layer and its hidden
layer as wide as the encoder's output (the official code: 4096 for a ResNet-50 2x), LARS lr 0.3 x B/256, wd 1e-6
(the current official README: 1e-4, from SimCLRv2), batch 4096, 100 epochs, 10 warmup, cosine, temperature 0.1,
the last BatchNorm of every residual block starting at zero, and the loss at the official code's scale: loss_a +
loss_b, the first views' and the second views' anchors each a mean over the batch, i.e. twice the paper's mean over
2N anchors. Under LARS that is not a constant factor: weight decay joins the gradient before the trust ratio, and
the 1-D parameters skip the trust ratio. ImageNet linear top-1 of a ResNet-50: 64.5 after 100 epochs (paper
Table 1), 69.3 after 1000 (Table 6); CIFAR-10: 94.0 (App. B.9), ~91 with a ResNet-18 (README).

Departures from the official code: its LARS multiplies by the lr inside the momentum (v <- m v + lr g), which
differs from lr x (m v + g) while the lr changes (warmup, cosine), and excludes parameters from decay and the
trust ratio by name, here by shape (1-D); its blur draws one sigma per batch, here one per image.

SimCLR-abs and SimCLR-sq (`--similarity abs|sq`; Garrido et al., "On the duality between contrastive and
non-contrastive self-supervised learning", ICLR 2023, section 3): the cosine similarity s of every negative pair
enters the softmax as |s| / T or s^2 / T instead of s / T, so the loss pushes negatives towards orthogonal rather
than opposite, as the sample-contrastive criterion ||K^T K - diag(K^T K)||^2 does. The positive pair's term stays
s / T, in the numerator and in the denominator; the view itself stays out. Everything else (gather, scale,
--negatives) is unchanged. The paper's main text describes them only as SimCLR with the square or the absolute
value of the cosine similarities; its supplementary's exact terms could not be read and no official code was
found, so this is that reading, not a confirmed one. Reported there (ImageNet, ResNet-50, 100 epochs, online
linear probe): SimCLR-abs 68.71 against 68.61 for their tuned SimCLR (projector 8192-8192-d, temperature 0.15,
base lr 0.5).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import common

METHOD = "simclr"


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
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch", type=int, default=4096, help="global batch size, summed over processes")
    p.add_argument("--optimizer", default="lars", help="lars, sgd or adamw")
    p.add_argument("--lr", type=float, default=0.3, help="base learning rate per 256 images")
    p.add_argument("--wd", type=float, default=1e-6, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs")
    p.add_argument("--aug", default="simclr", help="augmentation recipe (common.RECIPES); CIFAR: simclr-cifar")
    p.add_argument("--temperature", type=float, default=0.1, help="temperature of the softmax over similarities")
    p.add_argument("--mlp", default="embed-128", help="projector widths, the last the embedding (embed: the encoder's)")
    p.add_argument("--negatives", type=int, default=0, help="random negatives per anchor (0: all 2N-2)")
    p.add_argument("--similarity", default="cos", choices=["cos", "abs", "sq"], help="abs, sq: SimCLR-abs, SimCLR-sq")
    return common.parse_args(p, argv)


# ----------------------------------------------------------------------------------------------------------
# Method


def nt_xent(z1, z2, temperature, negatives=0, similarity="cos"):
    """NT-Xent over the 2N views of the global batch at the official code's scale, loss_a + loss_b (see the module
    docstring); similarity abs or sq: SimCLR-abs or SimCLR-sq. z1, z2: (n, d), this process's two views."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d) local anchors
    keys = torch.cat([common.gather(z[:n]), common.gather(z[n:])])  # (2N, d): all first views, then all second
    N = keys.shape[0] // 2
    mine = torch.arange(n, device=z.device) + common.rank() * n  # our images' global indices
    self_idx, pos_idx = torch.cat([mine, mine + N]), torch.cat([mine + N, mine])
    sim = z @ keys.T  # (2n, 2N) cosine similarities
    if similarity != "cos":  # the negatives' similarities become |s| or s^2; the positive's stays s
        transformed = sim.abs() if similarity == "abs" else sim.square()
        sim = transformed.scatter(1, pos_idx[:, None], sim.gather(1, pos_idx[:, None]))
    logits = (sim / temperature).scatter(1, self_idx[:, None], float("-inf"))  # a view is not its own negative
    if negatives:  # K random negatives per anchor (Bordes et al. 2023); the positive scores 2, the view itself -1
        score = torch.rand_like(logits).scatter(1, pos_idx[:, None], 2.0).scatter(1, self_idx[:, None], -1.0)
        logits = logits.masked_fill(score < score.topk(negatives + 1, dim=1).values[:, -1:], float("-inf"))
    return F.cross_entropy(logits, pos_idx, reduction="sum") / n  # loss_a + loss_b


def mlp(in_dim, widths):
    """The official code's head: (Linear, BN, ReLU) per hidden width, then the output layer."""
    layers = []
    for width in widths[:-1]:
        layers += [nn.Linear(in_dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_dim = width
    layers += [nn.Linear(in_dim, widths[-1], bias=False), nn.BatchNorm1d(widths[-1])]
    layers[-1].bias.requires_grad_(False)
    return nn.Sequential(*layers)


class SimCLR(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args)
        dim = self.backbone.embed_dim
        self.projector = mlp(dim, [dim if w == "embed" else int(w) for w in args.mlp.split("-")])
        self.args = args

    def forward(self, views):
        z1, z2 = self.projector(self.backbone(torch.cat(views))).chunk(2)
        loss = nt_xent(z1, z2, self.args.temperature, self.args.negatives, self.args.similarity)
        return loss, {}


# ----------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = get_args(argv)
    env = common.init(args, args.out)
    peak_lr = common.scaled_lr(args, env)
    augment = common.make_views(args.aug, args.img_size)
    loader = common.train_loader(args, env, augment)
    net = SimCLR(args).to(env.device)  # METHOD: the model
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
