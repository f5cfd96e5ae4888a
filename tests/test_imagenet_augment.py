"""The ``fbresnet`` ImageNet recipe (robbench/data/fbresnet_augment.py): each colour step against its
definition on images whose answer is known by hand, the draws, determinism per seed, and the folder loader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robbench.data import BatchLoader, load_split
from robbench.data import fbresnet_augment as fb
from robbench.data.base import seeded_generator
from robbench.errors import ConfigError


def _const(r: float, g: float, b: float, h: int = 4, w: int = 5) -> torch.Tensor:
    return torch.tensor([r, g, b], dtype=torch.float64)[:, None, None].expand(3, h, w).clone()


# ----------------------------------------------------------------------------------------- lighting

def test_lighting_adds_eigvec_times_alpha_eigval():
    alpha = (0.1, -0.05, 0.02)
    # by hand: offset_c = sum_j V[c][j] * alpha_j * eigval_j, eigval = (0.2175, 0.0188, 0.0045) * 255
    e = (55.4625, 4.794, 1.1475)
    hand = [-0.5675 * 0.1 * e[0] + 0.7192 * -0.05 * e[1] + 0.4009 * 0.02 * e[2],
            -0.5808 * 0.1 * e[0] - 0.0045 * -0.05 * e[1] - 0.8140 * 0.02 * e[2],
            -0.5836 * 0.1 * e[0] - 0.6948 * -0.05 * e[1] + 0.4203 * 0.02 * e[2]]
    assert fb.lighting_offset(alpha).tolist() == pytest.approx(hand, abs=1e-9)
    assert hand == pytest.approx([-3.31073, -3.23888, -3.06061], abs=1e-4)
    out = fb.lighting(_const(100, 100, 100), alpha)
    assert out[:, 0, 0].tolist() == [96.0, 96.0, 96.0]           # floor(100 - 3.3...) for each channel
    assert fb.lighting(_const(1, 254, 2), (0.0, 0.0, 0.0)).equal(_const(1, 254, 2))
    assert fb.lighting(_const(2, 2, 2), (1.0, 0.0, 0.0))[:, 0, 0].tolist() == [0.0, 0.0, 0.0]  # clipped at 0


def test_lighting_in_rgb_equals_the_reference_bgr_constants():
    # the reference reverses eigval and both axes of eigvec because its images are BGR: the offset per
    # colour is then the RGB offset with the alphas reversed (the same distribution)
    alpha = np.array([0.03, -0.11, 0.07])
    vec, val = np.array(fb.EIGVEC), np.array(fb.EIGVAL)
    bgr = vec[::-1, ::-1] @ (alpha * val[::-1])
    rgb = fb.lighting_offset(alpha[::-1].tolist()).numpy()
    assert rgb[::-1] == pytest.approx(bgr, abs=1e-9)


# -------------------------------------------------------------------- brightness / contrast / saturation

def test_brightness_scales_then_clips_and_truncates_like_uint8():
    assert fb.brightness(_const(100, 200, 101), 1.4)[:, 0, 0].tolist() == [140.0, 255.0, 141.0]
    assert fb.brightness(_const(100, 200, 101), 0.6)[:, 0, 0].tolist() == [60.0, 120.0, 60.0]  # 60.6 -> 60


def test_contrast_is_per_channel_mean_blend():
    assert fb.contrast(_const(30, 120, 250), 1.4).equal(_const(30, 120, 250))  # a constant image is its mean
    x = _const(50, 10, 0)
    x[:, :, 2:] += torch.tensor([100.0, 20.0, 200.0])[:, None, None].expand(3, 4, 3)  # 2 columns low, 3 high
    # channel means: R 50 + 0.6*100 = 110, G 10 + 0.6*20 = 22, B 0.6*200 = 120
    out = fb.contrast(x, 1.4)
    assert out[:, 0, 0].tolist() == [26.0, 5.0, 0.0]       # 110 + 1.4*(50-110) = 26; 22 - 16.8 = 5.2; 120 - 168 < 0
    assert out[:, 3, 4].tolist() == [166.0, 33.0, 232.0]   # 110 + 1.4*40 = 166; 22 + 11.2 = 33.2; 120 + 112 = 232
    out = fb.contrast(x, 0.6)
    assert out[:, 0, 0].tolist() == [74.0, 14.0, 48.0] and out[:, 0, 2].tolist() == [134.0, 26.0, 168.0]


def test_saturation_keeps_gray_images_and_blends_colour_with_8bit_luma():
    for s in (0.6, 1.0, 1.4):
        assert fb.saturation(_const(77, 77, 77), s).equal(_const(77, 77, 77))
    # luma of (200, 100, 50): (4899*200 + 9617*100 + 1868*50 + 8192) >> 14 = 2043092 >> 14 = 124
    assert fb.gray_u8(_const(200, 100, 50))[0, 0].item() == 124
    assert fb.saturation(_const(200, 100, 50), 1.4)[:, 0, 0].tolist() == [230.0, 90.0, 20.0]  # x*1.4 - 124*0.4
    assert fb.saturation(_const(200, 100, 50), 0.6)[:, 0, 0].tolist() == [169.0, 109.0, 79.0]  # x*0.6 + 124*0.4
    assert fb.gray_u8(_const(255, 255, 255))[0, 0].item() == 255 and fb.gray_u8(_const(0, 0, 0))[0, 0].item() == 0


# ------------------------------------------------------------------------------------ draws, determinism

def test_colour_params_ranges_and_random_order():
    orders, params = set(), []
    for seed in range(200):
        p = fb.colour_params(torch.Generator().manual_seed(seed))
        assert sorted(p["order"]) == sorted(fb.COLOUR_STEPS)
        orders.add(tuple(p["order"]))
        params.append(p)
    assert len(orders) >= 20                     # 24 orders possible; one permutation per image
    b = [p["brightness"] for p in params]
    c = [p["contrast"] for p in params]
    s = [p["saturation"] for p in params]
    a = np.array([p["lighting"] for p in params])
    assert 0.6 <= min(b) < 0.65 and 1.35 < max(b) <= 1.4
    assert 0.6 <= min(c) < 0.65 and 1.35 < max(c) <= 1.4
    assert 0.6 <= min(s) < 0.65 and 1.35 < max(s) <= 1.4
    assert abs(a.mean()) < 0.02 and 0.08 < a.std() < 0.12  # N(0, 0.1^2)


def test_apply_colour_follows_the_drawn_order():
    x = torch.tensor([[[10.0, 250.0]], [[120.0, 30.0]], [[200.0, 60.0]]], dtype=torch.float64)
    p = {"brightness": 1.3, "contrast": 0.7, "saturation": 1.4, "lighting": [0.05, 0.1, -0.1]}
    for order in (["brightness", "contrast", "saturation", "lighting"], ["lighting", "saturation", "contrast", "brightness"]):
        y = x.clone()
        for name in order:
            y = fb.STEPS[name](y, p[name])
        assert fb.apply_colour(x, {**p, "order": order}).equal(y)
    a = fb.apply_colour(x, {**p, "order": ["brightness", "contrast", "saturation", "lighting"]})
    b = fb.apply_colour(x, {**p, "order": ["lighting", "saturation", "contrast", "brightness"]})
    assert not a.equal(b)                       # the order matters (clipping, truncation, the means)


def test_fbresnet_colour_is_a_pure_function_of_the_seed_and_returns_uint8_levels():
    x = torch.randint(0, 256, (3, 9, 7), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    a = fb.fbresnet_colour(x, seeded_generator("augment", 0, 0, 1, 2, 5))
    b = fb.fbresnet_colour(x, seeded_generator("augment", 0, 0, 1, 2, 5))
    c = fb.fbresnet_colour(x, seeded_generator("augment", 0, 0, 1, 2, 6))
    assert a.equal(b) and not a.equal(c)
    assert a.dtype == torch.float32 and a.shape == (3, 9, 7) and 0.0 <= float(a.min()) <= float(a.max()) <= 1.0
    assert torch.equal(a * 255, (a * 255).round())  # integer levels, as the reference's uint8 image
    with pytest.raises(ValueError):
        fb.fbresnet_colour(x.float(), torch.Generator())


# --------------------------------------------------------------------------------------- GoogLeNet crop

def test_googlenet_crop_in_bounds_with_its_area_and_aspect_ranges():
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(300):
        box = fb.googlenet_crop_params(300, 200, g)
        if box is None:
            continue
        top, left, h, w = box
        assert 0 <= top <= 200 - h and 0 <= left <= 300 - w
        assert 0.08 * 60000 * 0.95 <= h * w <= 60000
        ratios.append(w / h)
    assert len(ratios) >= 290
    assert min(ratios) >= 0.75 * 0.95 and max(ratios) <= 1.333 / 0.95
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # both orientations (the 0.5 swap)
    assert fb.googlenet_crop_params(1000, 10, g) is None  # no 8% crop of aspect <= 4/3 fits: the fallback


# ------------------------------------------------------------------------------------------ folder loader

def _folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            d = root / "imagenet" / split / wnid
            d.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 256, (30 + 5 * k, 40, 3), dtype=np.uint8)).save(d / f"i{k}.png")


def test_folder_recipe_fbresnet_training_batches_and_evaluation(tmp_path):
    _folder(tmp_path)
    opts = {"crop_size": 16, "resize_size": 18, "num_workers": 0, "recipe": "fbresnet"}
    tr = load_split("imagenet", "train", tmp_path, opts)
    tv = load_split("imagenet", "train", tmp_path, {**opts, "recipe": "torchvision"})
    assert tr.recipe == "fbresnet" and tv.recipe == "torchvision"
    a, ya = tr.load_batch([0, 1, 2], "crop_flip", ("augment", 0, 0, 0, 0))
    b, yb = tr.load_batch([0, 1, 2], "crop_flip", ("augment", 0, 0, 0, 0))
    c, _ = tr.load_batch([0, 1, 2], "crop_flip", ("augment", 0, 0, 1, 0))
    t, _ = tv.load_batch([0, 1, 2], "crop_flip", ("augment", 0, 0, 0, 0))
    assert a.equal(b) and ya.equal(yb) and not a.equal(c) and not a.equal(t)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and 0 <= float(a.min()) <= float(a.max()) <= 1
    assert torch.equal(a * 255, (a * 255).round())
    loader = BatchLoader(tr, 2, shuffle=True, augment="default", seed=0)
    first, again = list(loader.epoch(1)), list(loader.epoch(1))
    assert all(x.equal(y) for (x, _), (y, _) in zip(first, again))
    # evaluation: no colour steps, short side to 18 (bicubic) + centre crop, identical on every call
    te = load_split("imagenet", "test", tmp_path, opts)
    x1, _ = te.get([0, 3])
    x2, _ = te.get([0, 3])
    assert x1.shape == (2, 3, 16, 16) and x1.equal(x2)


def test_recipe_option_is_checked():
    with pytest.raises(ConfigError, match=r"data\.options\.recipe.*'torchvision' \| 'fbresnet'"):
        load_split("imagenet", "train", Path("/nonexistent"), {"recipe": "inception"})
