"""MAE: Masked Autoencoders Are Scalable Vision Learners.
Kaiming He, Xinlei Chen, Saining Xie, Yanghao Li, Piotr Dollar, Ross Girshick. CVPR 2022. arxiv.org/abs/2111.06377

A ViT encoder sees a random 25% of the patches; a light decoder gets them plus mask tokens at every position
and predicts the pixels of the removed patches (MSE on those only, targets normalised per patch).

CPU demo: 5 min on 2 cores (AVX2, fp32), ViT-tiny with 8 px patches; the loss falls from 1.20 to 0.73. MAE's
features need a trained classifier: the BatchNorm linear probe (python eval_linear.py --ckpt runs/mae/backbone.pt)
reads 52.5 against 38.9 for the same ViT at random init, but the k-NN monitor reads 21.1 against 29.9:
    python mae.py --dataset synthetic --arch vit_tiny --patch-size 8 --batch 64 --epochs 5 --warmup-epochs 1 \\
        --lr 2e-3 --decoder-dim 128 --decoder-depth 2 --workers 2 --knn-every 1

Usage:
    torchrun --nproc_per_node=8 mae.py --dataset imagenet --data /data/imagenet --batch 4096
    python mae.py --out runs/mae --recon      # with the run's other flags: recon.png from its checkpoint, then exit
    python eval_linear.py --ckpt runs/mae/backbone.pt         # BatchNorm probe on [CLS], as MAE's linear probing

Defaults: the paper's ViT-B/16 recipe: mask 0.75, fixed sine-cosine position embeddings, decoder 512 wide, 8
blocks of 16 heads, normalised pixels (the released models; code default: off), AdamW (0.9, 0.95), lr 1.5e-4 x
B/256 (code: 1e-3), wd 0.05, batch 4096, 800 epochs, 40 warmup, cosine; crop 0.2-1 and flip. CIFAR: vit_small,
patch 4 (solo-learn). ImageNet ViT-B/16, 1600 epochs: fine-tuned 83.6 (Table 3), linear probe 68.0 (Table 12).
"""

import argparse
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import common

METHOD = "mae"


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
    p.add_argument("--arch", default="vit_base", choices=["vit_tiny", "vit_small", "vit_base"], help="a ViT")
    p.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier (SimCLR's 2x, 4x)")
    p.add_argument("--epochs", type=int, default=800, help="training epochs")
    p.add_argument("--batch", type=int, default=4096, help="global batch size, summed over processes")
    p.add_argument("--optimizer", default="adamw", help="lars, sgd or adamw")
    p.add_argument("--lr", type=float, default=1.5e-4, help="base learning rate per 256 images")
    p.add_argument("--wd", type=float, default=0.05, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, default=40, help="linear warmup epochs")
    p.add_argument("--aug", default="mae", help="augmentation recipe (common.RECIPES)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    p.add_argument("--decoder-dim", type=int, default=512, help="decoder width")
    p.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks")
    p.add_argument("--norm-pix", type=int, default=1, help="1: targets are patches normalised by their mean and std")
    p.add_argument("--recon", action="store_true", help="write recon.png from the run in --out and exit")
    return common.parse_args(p, argv)


# ----------------------------------------------------------------------------------------------------------
# Method


def patchify(imgs, p):
    """(N, 3, H, W) -> (N, L, p*p*3); within a patch the values run over rows, then columns, then channels."""
    N, _, H, W = imgs.shape
    x = imgs.reshape(N, 3, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, 3)
    return x.reshape(N, (H // p) * (W // p), p * p * 3)


def unpatchify(x, p):
    """(N, L, p*p*3) -> (N, 3, H, W) for a square grid of patches: the inverse of patchify."""
    N, L, _ = x.shape
    h = int(L**0.5)
    return x.reshape(N, h, h, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(N, 3, h * p, h * p)


def random_masking(x, mask_ratio):
    """Keep a random int(L * (1 - mask_ratio)) tokens per sample (argsort of uniform noise). Returns the kept
    tokens (N, keep, D), the mask (N, L), 1 where removed, in the original order, and ids_restore (N, L)."""
    N, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.rand(N, L, device=x.device).argsort(dim=1)  # the smallest noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = (torch.arange(L, device=x.device) >= keep).float().expand(N, L)  # in shuffled order
    return x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D)), mask.gather(1, ids_restore), ids_restore


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sine-cosine position embeddings (1, 1 + grid**2, dim) as MAE's code: the first half of the
    channels encodes the column, the second the row; the [CLS] row is zero."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([f(t.reshape(-1, 1) * omega) for t in (cols, rows) for f in (torch.sin, torch.cos)], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()[None]


def mae_loss(imgs, pred, mask, patch_size, norm_pix=True):
    """MSE per patch (mean over its values), averaged over the removed patches only. With norm_pix each target
    patch is (x - mean) / sqrt(var + 1e-6), with its own mean and unbiased variance."""
    target = patchify(imgs.float(), patch_size)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = F.mse_loss(pred.float(), target, reduction="none").mean(-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()


class MAE(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args)
        dim = self.backbone.embed_dim
        self.backbone.pos_embed.data.copy_(sincos_pos_embed(dim, self.backbone.grid))
        self.backbone.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(dim, args.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, args.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(args.decoder_dim, self.backbone.grid))
        self.decoder_blocks = nn.Sequential(*[common.Block(args.decoder_dim, 16) for _ in range(args.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(args.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(args.decoder_dim, args.patch_size**2 * 3)
        for m in [m for m in self.modules() if isinstance(m, nn.Linear)] + [self.backbone.patch_embed.proj]:
            nn.init.xavier_uniform_(m.weight.view(len(m.weight), -1))  # the official init
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.backbone.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.args = args

    def predict(self, imgs):
        """Pixel predictions (N, L, p*p*3) for every patch, and the mask (N, L), 1 where removed."""
        tokens, mask, ids_restore = random_masking(self.backbone.embed(imgs), self.args.mask_ratio)
        x = self.decoder_embed(self.backbone.encode(tokens))  # (N, 1 + kept, Dd), [CLS] first
        fill = self.mask_token.expand(len(x), ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], fill], 1).gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:], mask

    def forward(self, views):
        pred, mask = self.predict(views[0])
        loss = mae_loss(views[0], pred, mask, self.args.patch_size, self.args.norm_pix)
        return loss, {}


@torch.no_grad()
def save_reconstruction(net, dataset, args, env):
    """recon.png: 8 fixed images, their visible patches, the reconstruction (norm-pix: with the true patch stats)."""
    if not env.main:
        return
    fixed = torch.stack([common.eval_transform(args.img_size)(dataset[i][0]) for i in range(8)])  # uint8
    imgs = common.to_device([fixed], args, env)[0]
    with torch.random.fork_rng(devices=[imgs.device] if imgs.is_cuda else []):
        torch.manual_seed(0)  # the same mask every time
        pred, mask = net.predict(imgs)
    p, target = net.args.patch_size, patchify(imgs.float(), net.args.patch_size)
    if net.args.norm_pix:
        pred = pred.float() * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    keep = 1 - mask[..., None]
    rows = [imgs, unpatchify(target * keep, p), unpatchify(target * keep + pred * (1 - keep), p)]
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    grid = torch.cat([row.float().cpu() * std + mean for row in rows]).clamp(0, 1)
    path = f"{args.out}/recon.png"
    common.atomic_save(grid, path, lambda x, f: torchvision.utils.save_image(x, f, "png", nrow=8, padding=1))


# ----------------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = get_args(argv)
    env = common.init(args, args.out)
    peak_lr = common.scaled_lr(args, env)
    augment = common.make_views(args.aug, args.img_size, views=1)  # METHOD: one view
    loader = common.train_loader(args, env, augment)
    net = MAE(args).to(env.device)  # METHOD: the model
    backbone = net.backbone  # what the run is for: backbone.pt and the k-NN monitor
    model = common.distribute(net, args, env)
    optimizer = common.build_optimizer(args, env, net, peak_lr, betas=(0.9, 0.95))  # METHOD:
    amp, scaler = common.autocast(args, env)
    flops = common.count_step_flops(net, augment.sizes, args, env)
    steps_per_epoch = len(loader)
    total_steps = common.training_steps(args, steps_per_epoch, flops)
    epochs = math.ceil(total_steps / steps_per_epoch)
    probe = common.OnlineProbe(backbone, args, env, total_steps)  # a linear classifier on detached features
    start_epoch, step, saved_log = common.resume(args, env, net, optimizer, scaler, steps_per_epoch, probe)
    common.write_args(args, env)
    if args.recon:  # METHOD: on demand
        return save_reconstruction(net, loader.dataset.base, args, env)  # METHOD:
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
        save_reconstruction(net, loader.dataset.base, args, env)  # METHOD: recon.png
    log.finish(step)


if __name__ == "__main__":
    common.run(main)
