"""bench/shortcuts.py: the lesion mask and the off-lesion share of a heatmap, on images generated here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "shortcuts.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_shortcuts", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skin_with_lesion(
    size: int = 224, centre=(120, 100), radius=40, vignette: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 skin with a brown disc, the disc's mask)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.float32)
    img[:] = (215, 170, 160)  # pink skin
    lesion = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    img[lesion] = (110, 70, 50)  # brown
    if vignette:
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (0.55 * size) ** 2] = 5  # a round field of view
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8), lesion


@pytest.mark.parametrize("vignette", [False, True])
def test_the_mask_finds_the_dark_lesion_and_leaves_the_dark_corners_out(bench, vignette):
    img, truth = _skin_with_lesion(vignette=vignette)
    mask = bench.lesion_mask(img)
    assert mask is not None
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85
    assert not mask[:10, :10].any() and not mask[-10:, -10:].any()


def test_a_flat_image_has_no_mask(bench):
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(180, 3, (224, 224, 3)), 0, 255).astype(np.uint8)
    assert bench.lesion_mask(img) is None


def test_the_outside_share_is_the_heatmap_mass_off_the_region(bench):
    disc = bench.disc_mask(100, 0.4)
    assert abs(disc.mean() - np.pi * 0.16) < 0.01  # a uniform heatmap puts 49.7% outside
    heat = np.zeros((100, 100))
    heat[45:55, 45:55] = 1.0  # all on the centre
    assert bench.outside_share(heat, disc) == 0.0
    heat[:5, :5] = 1.0  # a quarter of the mass in a corner
    assert bench.outside_share(heat, disc) == pytest.approx(25 / 125)
    assert bench.outside_share(np.zeros((100, 100)), disc) is None


def test_the_summary_has_a_row_per_set_and_class(bench, monkeypatch):
    img, _ = _skin_with_lesion()
    heat = np.zeros((224, 224), np.float32)
    heat[100:140, 80:120] = 1

    class Stub:
        def explain(self, image, target):
            return SimpleNamespace(
                image=img, heatmap=heat, prediction=SimpleNamespace(probability=0.7), target="malignant"
            )

    samples = [SimpleNamespace(path=SCRIPT, relpath=f"{i}.jpg", label=i % 2, diagnosis=None) for i in range(4)]
    monkeypatch.setattr(bench, "open_image", lambda path, relpath: None)  # the stub explains its own image
    rows = bench.measure(Stub(), {"a": samples}, "predicted", 0.4)
    blocks = bench.summarise(rows, 200, 0)
    assert [(b["set"], b["class"], b["n"]) for b in blocks] == [("a", "benign", 2), ("a", "malignant", 2)]
    assert blocks[0]["outside_disc"]["value"] == 0.0 and blocks[0]["outside_lesion"]["value"] < 0.2
    table = bench.markdown(blocks, 0.4)
    assert table.count("\n") == 3  # a header, its rule and two rows
    assert "| 2 | 0 | 0.000 [0.000, 0.000] | 0 |" in table  # n, no heatmap, outside disc, mostly outside
    assert "| 0 | 0 | 0 / 2 |" in table  # no mask, dark corners, explained as benign / malignant


def test_a_heatmap_exactly_on_the_lesion_still_spills_at_grad_cam_resolution(bench):
    _, truth = _skin_with_lesion(radius=20)  # a small lesion: a 7x7 map cannot stay inside it
    small = bench.outside_share(bench.coarse(truth, 7), truth)
    _, big = _skin_with_lesion(radius=70)
    large = bench.outside_share(bench.coarse(big, 7), big)
    assert 0 < large < small < 1 - truth.mean()  # better than uniform, worse the smaller the lesion
