"""The batched augmentation engine: each op against torchvision, and the parameter distributions measured from
the pixels of both paths (rendered in loader workers, and on the training device with --gpu-aug)."""

import colorsys
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

import common

N = 600  # draws per distribution; the KS thresholds below are for p < 0.001


def render(views, images, path):
    """All views of the images, uint8 (worker path) or normalised on the device (--gpu-aug path), as uint8."""
    augmented = common.Augmented(list(zip(images, [0] * len(images))), views.draw, seed=5)
    batch = [augmented[(0, i)] for i in range(len(images))]
    if path == "worker":
        return views.collate(batch)[0]
    args, env = SimpleNamespace(arch="vit_tiny"), common.Env(torch.device("cpu"))
    out = common.to_device(views.render_on_device(views.collate_raw(batch)[0], env.device), args, env)
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    return [((v * std + mean) * 255).round().clamp(0, 255).to(torch.uint8) for v in out]


def hue(pixel):
    """The HSV hue (in turns) of an RGB pixel in 0-255."""
    return colorsys.rgb_to_hsv(*(pixel / 255).tolist())[0]


def ks_two_sample(a, b):
    a, b = (
        torch.sort(torch.as_tensor(a, dtype=torch.float64))[0],
        torch.sort(torch.as_tensor(b, dtype=torch.float64))[0],
    )
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def ks_uniform(x, lo, hi):
    x = torch.sort(torch.as_tensor(x, dtype=torch.float64))[0]
    cdf = ((x - lo) / (hi - lo)).clamp(0, 1)
    i = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
    return max((i - cdf).abs().max().item(), (cdf - (i - 1 / len(x))).abs().max().item())


def test_color_ops_match_torchvision():
    x = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.3, 0.7, 1.0, 1.3, 1.6, 0.0])
    shifts = torch.tensor([-0.5, -0.3, -0.05, 0.0, 0.2, 0.5])
    refs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for which, ref in enumerate(refs):
        f = shifts if which == 3 else factors
        want = torch.stack([ref(x[i], float(f[i])) for i in range(6)])
        torch.testing.assert_close(common.color_op(x.clone(), f, which), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(common.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    want = torch.stack([TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2) for i in range(6)])
    torch.testing.assert_close(common.gaussian_blur(x, sigma, 7), want, atol=1e-6, rtol=0)


def coordinate_image(h=96, w=128):
    """Red encodes the column (2 levels a pixel), green the row: a crop's box can be read back from its pixels."""
    xs, ys = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    return torch.stack([2 * xs, 2 * ys, torch.zeros_like(xs)]).to(torch.uint8)


@pytest.mark.parametrize("path", ["worker", "gpu-aug"])
def test_crop_scale_and_aspect_follow_random_resized_crop(path):
    h, w, size, scale = 96, 128, 32, (0.08, 1.0)
    spec = common.ViewSpec(size, scale, jitter_p=0.0, gray_p=0.0, flip_p=0.0)
    crops = render(common.Views([spec]), [coordinate_image(h, w)] * N, path)[0].float()
    q = slice(size // 4, 3 * size // 4)  # slopes between interior pixels: two levels of red per source pixel
    crop_w = (crops[:, 0, q, 3 * size // 4] - crops[:, 0, q, size // 4]).mean(1) / 2 / (size // 2) * size
    crop_h = (crops[:, 1, 3 * size // 4, q] - crops[:, 1, size // 4, q]).mean(1) / 2 / (size // 2) * size
    # torchvision's own sampler on the same image size is the reference
    sampler = v2.RandomResizedCrop(size, scale=scale)
    torch.manual_seed(0)
    ref = [sampler.make_params([torch.zeros(3, h, w)]) for _ in range(N)]
    ref_w, ref_h = torch.tensor([float(r["width"]) for r in ref]), torch.tensor([float(r["height"]) for r in ref])
    ours_scale, ref_scale = crop_w * crop_h / (h * w), ref_w * ref_h / (h * w)
    assert ks_two_sample(ours_scale, ref_scale) < 0.12
    assert ks_two_sample((crop_w / crop_h).log(), (ref_w / ref_h).log()) < 0.12
    assert ours_scale.min() > 0.07 and ours_scale.max() < 1.02
    assert (crop_w / crop_h).log().abs().max() < math.log(4 / 3) + 0.03


def jitter_spec(which, amount):
    jitter = [0.0] * 4
    jitter[which] = amount
    return common.ViewSpec(16, (1.0, 1.0), (1.0, 1.0), tuple(jitter), jitter_p=1.0, gray_p=0.0, flip_p=0.0)


@pytest.mark.parametrize("path", ["worker", "gpu-aug"])
def test_jitter_factors_are_uniform_in_the_recipe_ranges(path):
    # brightness: a flat grey image scales by the factor
    flat = torch.full((3, 16, 16), 100, dtype=torch.uint8)
    out = render(common.Views([jitter_spec(0, 0.4)]), [flat] * N, path)[0].float()
    assert ks_uniform(out[:, 0, 8, 8] / 100, 0.6, 1.4) < 0.1
    # contrast: two halves of 60 and 160 move apart or together about their mean
    halves = torch.full((3, 16, 16), 60, dtype=torch.uint8)
    halves[:, :, 8:] = 160
    out = render(common.Views([jitter_spec(1, 0.4)]), [halves] * N, path)[0].float()
    assert ks_uniform((out[:, 0, 8, 12] - out[:, 0, 8, 3]) / 100, 0.6, 1.4) < 0.1
    # saturation and hue of a flat orange image
    orange = torch.tensor([200, 120, 40], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16).contiguous()
    out = render(common.Views([jitter_spec(3, 0.1)]), [orange] * N, path)[0].float()
    hue0 = hue(orange[:, 0, 0].float())
    shifts = [(hue(px) - hue0 + 0.5) % 1 - 0.5 for px in out[:, :, 8, 8]]
    assert ks_uniform(shifts, -0.1, 0.1) < 0.1
    out = render(common.Views([jitter_spec(2, 0.4)]), [orange] * N, path)[0].float()
    gray = sum(w * c for w, c in zip(common.GRAY_WEIGHTS, (200, 120, 40)))  # saturation blends towards it
    assert ks_uniform((out[:, 0, 8, 8] - gray) / (200 - gray), 0.6, 1.4) < 0.1


def test_probabilities_and_the_two_paths_agree():
    spec = common.ViewSpec(24, (0.2, 1.0), gray_p=0.2, blur_p=0.5, solarize_p=0.2)
    img = common.SyntheticTextures(1, 64, seed=0)[0][0]
    views = common.Views([spec])
    rows = torch.stack([views.draw(img)[1][0] for _ in range(4000)])
    for col, p in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.2)]:
        assert abs(rows[:, getattr(common.COL, col)].mean().item() - p) < 0.03, col
    worker, device = render(views, [img] * 64, "worker")[0].float(), render(views, [img] * 64, "gpu-aug")[0].float()
    # the same draws: only the resampling differs (F.interpolate's bicubic against roi_align's bilinear)
    assert (worker - device).abs().mean() < 6 and (worker - device.roll(1, 0)).abs().mean() > 20


def test_jpeg_draft_decodes_at_reduced_size_never_below_the_views(tmp_path):
    from PIL import Image

    Image.fromarray(torch.randint(0, 255, (400, 600, 3), dtype=torch.uint8).numpy()).save(tmp_path / "a.jpg")
    assert common.ImageFiles(str(tmp_path))[0][0].shape == (3, 400, 600)
    assert common.ImageFiles(str(tmp_path), draft_side=100)[0][0].shape == (3, 100, 150)
    assert common.ImageFiles(str(tmp_path), draft_side=150)[0][0].shape == (3, 200, 300)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoded_jpegs_are_pils_pixels_at_full_size_and_in_draft_mode(mode, tmp_path):
    """decode_image's faster path (torchvision.io.decode_jpeg for a JPEG decoded at full size) and PIL's draft
    path both give exactly what PIL's own decode and RGB conversion give."""
    import numpy as np
    from PIL import Image

    shape = (120, 90, 3) if mode == "RGB" else (120, 90)
    Image.fromarray(torch.randint(0, 255, shape, dtype=torch.uint8).numpy()).save(tmp_path / "a.jpg", quality=90)
    for draft_side in (0, 40):
        with Image.open(tmp_path / "a.jpg") as im:
            if draft_side:
                im.draft("RGB", (draft_side, draft_side))
            want = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        got = common.decode_image(str(tmp_path / "a.jpg"), draft_side)
        assert got.shape == ((3, 60, 45) if draft_side else (3, 120, 90))
        assert torch.equal(got, want)


@pytest.mark.slow
def test_gpu_aug_trains_like_the_worker_path(tmp_path):
    """--gpu-aug renders the same draws in to_device: the first losses match the worker path's closely. Within 3%,
    as bench/gpu_check.py: the workers resize bicubically, roi_align on the device bilinearly (measured: 2.6% apart;
    under 2% when both were bilinear)."""
    from conftest import TINY, run_script

    losses = {}
    for flag in ["", "--gpu-aug"]:
        out = tmp_path / (flag or "workers")
        proc = run_script(
            "simclr.py",
            *TINY,
            "--epochs",
            "1",
            "--subset",
            "64",
            "--knn-every",
            "0",
            "--out",
            out,
            *([flag] if flag else []),
        )
        losses[flag] = [r["loss"] for r in common.read_log(out / "log.jsonl") if "loss" in r]
        assert ("--gpu-aug without a GPU: the crops, colour and blur run in the training process" in proc.stdout) == (
            flag == "--gpu-aug"
        )  # works on a CPU, and says where the work went
    assert len(losses[""]) == 1 and abs(losses[""][0] - losses["--gpu-aug"][0]) < 0.03 * losses[""][0]


def test_solo_learn_cifar_recipes():
    """solo-learn's scripts/pretrain/cifar configs: BYOL's asymmetric set without blur (solarize 0 / 0.2), VICReg's
    symmetric set with crops of 0.2-1, solarize 0.1 and no blur; both jitter 0.4/0.4/0.2/0.1 with p 0.8, gray 0.2,
    flip 0.5."""
    shared = {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "gray_p": 0.2, "blur_p": 0.0, "flip_p": 0.5}
    expected = {
        "byol-cifar": [{"scale": (0.08, 1.0), "solarize_p": 0.0}, {"scale": (0.08, 1.0), "solarize_p": 0.2}],
        "vicreg-cifar": [{"scale": (0.2, 1.0), "solarize_p": 0.1}] * 2,
    }
    for name, views in expected.items():
        specs = common.make_views(name, 32).specs
        assert [{k: getattr(s, k) for k in {**shared, **v}} for s, v in zip(specs, views)] == [
            {**shared, **v} for v in views
        ]
        assert all(s.size == 32 and s.ratio == (3 / 4, 4 / 3) and s.noise == 0 for s in specs)


def test_worker_crops_are_torchvisions_bicubic_antialiased_resized_crop():
    """The worker path resizes each crop as torchvision's resized_crop with bicubic, antialiased resampling (the
    official code's interpolation); no colour, no flip, so the view is the resized crop itself."""
    spec = common.ViewSpec(24, (0.08, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0)
    views = common.Views([spec])
    img = common.SyntheticTextures(1, 64, seed=2)[0][0]
    for _ in range(5):
        _, params = views.draw(img)
        top, left, height, width = params[0, :4].int().tolist()
        got = views.render([img], params[None])[0][0]
        want = TF.resized_crop(img, top, left, height, width, [24, 24], v2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(got, want)


def test_each_view_comes_out_as_if_its_image_were_rendered_alone():
    """A batch's rows are sorted (blurred last, then by jitter order), cut into chunks, blurred as one slice per
    chunk, grayscaled and solarized through a gather and a scatter, and put back in order: every view must equal
    the one rendered from its image alone. DINO at 160 px with six 64 px local crops: 32 global rows in three
    chunks, 96 local rows in two, with blur, grayscale and solarize all drawn."""
    views = common.make_views("dino", 160, local_crops=6, patch=16)
    augmented = common.Augmented(common.SyntheticTextures(16, 200, seed=0), views.draw, seed=3)
    batch = [augmented[(0, i)] for i in range(16)]
    images, params = zip(*[item for item, _ in batch])
    params = torch.stack(params)
    rows = params.flatten(0, 1)
    assert rows[:, common.COL.blur].any() and not rows[:, common.COL.blur].all()
    assert rows[:, common.COL.gray].any() and rows[:, common.COL.solarize].any()
    cpu = torch.device("cpu")
    assert common.rows_per_chunk(160, 32, cpu) < 32 and common.rows_per_chunk(64, 96, cpu) < 96
    rendered = views.collate(batch)[0]
    for i, img in enumerate(images):
        alone = views.render([img], params[i : i + 1])
        assert all(torch.equal(a[0], r[i]) for a, r in zip(alone, rendered))
