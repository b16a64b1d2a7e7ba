"""Finetune's augmentations: dermoscopy as it always was, and the shortcut, colour and aspect extras."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch

from lesionlab.data.image_cache import GROW, ImageCache, ImageSpec
from lesionlab.training.augment import (
    RULER,
    add_shortcuts,
    augment_batch,
    ink_mask,
    ruler_mask,
    stretch,
    strong_color,
    vignette_gain,
)
from lesionlab.training.augment_names import EXTRAS
from lesionlab.training.config import ConfigError, TrainConfig
from lesionlab.training.distributed import Ranks
from lesionlab.training.sources import ImageSource

SPECS = ["dermoscopy", *(f"dermoscopy+{e}" for e in EXTRAS), "dermoscopy+shortcuts+color+aspect"]


def _images(n: int, h: int, w: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _grey(n: int, size: int, level: float = 160.0) -> torch.Tensor:
    return torch.full((n, 3, size, size), level)


def _old_dermoscopy(images: torch.Tensor, size: int) -> torch.Tensor:
    """augment_batch as it was before the extras existed, verbatim."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)
    jitter = v2.ColorJitter(0.15, 0.15, 0.1, 0.02)
    out = []
    for img in images:
        img = crop(img)
        if torch.rand(1) < 0.5:
            img = img.flip(-1)
        if torch.rand(1) < 0.5:
            img = img.flip(-2)
        img = torch.rot90(img, int(torch.randint(0, 4, (1,))), dims=(-2, -1))
        out.append(jitter(img))
    return torch.stack(out)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_dermoscopy_gives_the_draws_and_pixels_it_always_gave():
    images = _images(6, 64, 64)
    torch.manual_seed(7)
    out = augment_batch(images, 48)
    # captured from augment_batch before the extras were added (torch 2.14.1, torchvision 0.29.1)
    assert _sha(out) == "5bfd7aed174b499f740839a9a88d3524fec4b045bde76043d4b0e0785f5d94c1"
    torch.manual_seed(7)
    assert torch.equal(augment_batch(images, 48, "dermoscopy"), out)
    torch.manual_seed(7)
    assert torch.equal(_old_dermoscopy(images, 48), out)
    # non-square input, and the generator left where it always was (resumed runs depend on it)
    torch.manual_seed(7)
    wide = _images(3, 80, 60, seed=99)
    torch.manual_seed(7)
    new = augment_batch(wide, 32, "dermoscopy")
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(_old_dermoscopy(wide, 32), new)
    assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("spec", SPECS)
def test_every_augmentation_is_uint8_at_the_size_and_repeatable_under_a_seed(spec):
    images = _images(5, 60, 80)
    torch.manual_seed(3)
    a = augment_batch(images, 40, spec)
    torch.manual_seed(3)
    b = augment_batch(images, 40, spec)
    torch.manual_seed(4)
    c = augment_batch(images, 40, spec)
    assert a.shape == (5, 3, 40, 40) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_none_leaves_the_images_alone():
    images = _images(2, 32, 32)
    assert augment_batch(images, 32, "none") is images


def test_extras_after_the_crop_keep_dermoscopy_s_geometry():
    """shortcuts and color draw after dermoscopy's per-image draws: same seed, same crops; they change pixels."""
    images = _images(8, 64, 64)
    torch.manual_seed(0)
    base = augment_batch(images, 48).float()
    for spec in ("dermoscopy+shortcuts", "dermoscopy+color"):
        torch.manual_seed(0)
        extra = augment_batch(images, 48, spec).float()
        changed = (extra != base).any(dim=1).float().mean(dim=(1, 2))  # share of pixels changed, per image
        if spec == "dermoscopy+shortcuts":  # some images untouched (each artefact p=0.3), the others in places
            assert (changed == 0).any() and (changed > 0).any() and (changed < 0.9).all()
        else:  # every image recoloured
            assert (changed > 0.5).all()


def test_vignette_darkens_the_corners_and_not_the_centre():
    n, size = 16, 64
    torch.manual_seed(0)
    gain = vignette_gain(n, size, size, torch.ones(n, dtype=torch.bool))
    corners = gain[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.amin(dim=1) < 0.5).all()  # every image has dark corners (a wide field of view may spare one)
    assert (corners <= 0.2 + 1e-6).float().mean() > 0.5  # most at the dark floor of 0-0.2
    assert (gain[:, 24:40, 24:40] == 1).all()  # the field of view untouched
    out = add_shortcuts(_grey(n, size), p=1.0)  # with ruler and ink too: the corners still darkest
    patches = [out[:, :, r, c] for r in (slice(0, 4), slice(-4, None)) for c in (slice(0, 4), slice(-4, None))]
    corner_mean = torch.stack([p.mean(dim=(1, 2, 3)) for p in patches]).mean(dim=0)
    assert (corner_mean < out[:, :, 28:36, 28:36].mean(dim=(1, 2, 3))).all()


def test_ruler_marks_sit_along_one_edge():
    n, size = 16, 96
    keep = torch.ones(n, dtype=torch.bool)
    torch.manual_seed(0)
    alpha, colour = ruler_mask(n, size, size, keep)
    assert alpha.shape == (n, size, size) and colour.shape == (n, 3)
    reach = int(np.ceil((RULER["margin"][1] + 2 * RULER["tick"][1]) * size)) + 1
    for a in alpha:
        on = a > 0
        assert on.any()
        ys, xs = on.nonzero(as_tuple=True)
        near = [ys.max() < reach, ys.min() >= size - reach, xs.max() < reach, xs.min() >= size - reach]
        assert sum(bool(v) for v in near) >= 1  # every mark within the strip of one edge
        assert on.float().mean() < 0.15  # thin lines, not a filled band
    assert ((colour <= 20) | (colour >= 235)).all()  # dark or white


def test_ink_strokes_are_purple_or_blue_arcs_inside_the_image():
    n, size = 16, 96
    torch.manual_seed(0)
    alpha, colour = ink_mask(n, size, size, torch.ones(n, dtype=torch.bool))
    assert (colour[:, 2] > colour[:, 1] + 50).all()  # blue channel well above green: marker ink, not a lesion
    for a in alpha:
        share = (a > 0).float().mean()
        assert 0 < share < 0.25
    assert alpha.max() <= 0.85 + 1e-6


def test_only_the_chosen_images_get_an_artefact():
    x = _grey(20, 32)
    torch.manual_seed(0)
    out = add_shortcuts(x.clone(), p=0.0)
    assert torch.equal(out, x)


def test_strong_color_is_one_colour_map_per_image():
    x = _grey(64, 16)
    torch.manual_seed(0)
    out = strong_color(x)
    per_image = out.flatten(2)
    assert torch.allclose(per_image.std(dim=2), torch.zeros(64, 3), atol=1e-3)  # a flat image stays flat
    colours = per_image.mean(dim=2)
    assert colours.std(dim=0).min() > 5  # but its colour moves from image to image
    assert not torch.allclose(colours[:, 0] / colours[:, 2], torch.ones(64), atol=0.05)  # channels apart: gains


def test_stretch_lengthens_one_side_by_up_to_four_thirds():
    img = _images(1, 60, 90)[0]
    torch.manual_seed(0)
    shapes = [stretch(img).shape[-2:] for _ in range(50)]
    for h, w in shapes:
        assert (h == 60 and 90 <= w <= 120) or (w == 90 and 60 <= h <= 80)
    assert any(h > 60 for h, _ in shapes) and any(w > 90 for _, w in shapes)


@pytest.mark.parametrize(
    "bad", ["dermoscopy+shortcut", "shortcuts", "none+color", "dermoscopy+color+color", "Dermoscopy", "", "auto+color"]
)
def test_bad_spellings_are_refused_with_the_allowed_parts(bad):
    with pytest.raises(ConfigError, match="shortcuts, color, aspect"):
        TrainConfig(mode="finetune", augment=bad)


def test_one_spelling_per_augmentation():
    assert TrainConfig(mode="finetune", augment="dermoscopy+aspect+shortcuts").augment == "dermoscopy+shortcuts+aspect"
    cfg = TrainConfig(mode="finetune", augment="dermoscopy+color")
    assert cfg.augment == cfg.augmentation == "dermoscopy+color"
    assert TrainConfig(mode="finetune").augmentation == "dermoscopy"
    assert TrainConfig(mode="frozen").augmentation == "none"


def test_a_finetune_batch_carries_the_extras(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1] * 3, np.float32)
    cache = ImageCache(ImageSpec(32), tmp_path)
    cache.dir.mkdir(parents=True)
    cache._grow(GROW)  # slots for images that are not files
    for slot, img in enumerate(x):
        cache.put(slot, img)
    weights = cast(Any, SimpleNamespace(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    slots = np.arange(6)
    source = ImageSource(cache, slots, y, slots, y, weights)
    cfg = TrainConfig(mode="finetune", augment="dermoscopy+shortcuts+color+aspect", precision="fp32", batch_size=6)
    images, targets, classes, n_global = next(source.feed(cfg, Ranks()).epoch(1))
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8  # normalised on the device
    assert classes is None and n_global == 6
    assert not torch.equal(images, torch.from_numpy(x).permute(0, 3, 1, 2))  # augmented
    assert sorted(targets.tolist()) == sorted(y.tolist())
