"""How much of a model's Grad-CAM evidence lies off the lesion: a measure of shortcut learning.

Usage: python bench/shortcuts.py [MODEL_DIR] [--n 100] [--seed 0] [--disc 0.4] [--target predicted]
                                 [--kaggle DIR] [--isic2018 DIR] [--json FILE] [--threads 1]
                                 [--sheet FOLDER] [--sheet-n 4] [--sheet-order outside|sample]

No MODEL_DIR means the bundled model. On a seeded sample of ``--n`` images per class of the isic-kaggle test set
and of the ISIC 2018 Task 3 test set (malignant: MEL, BCC, AKIEC), each image is explained as ``lesionlab
explain`` does (``inference.explain.Explainer``: Grad-CAM on the last feature map at the model's input size,
ReLU'd and min-max scaled to [0, 1]; ``--target predicted`` is the label at the model's operating threshold).
No lesion masks ship with these sets, so "off the lesion" is measured two ways, as the share of the heatmap's
mass (sum of the heatmap outside / sum over the image):

- ``outside disc``: outside the central disc of radius ``--disc`` (0.4) of the image side (the disc covers
  50.3% of the image, so a uniform heatmap puts 49.7% outside);
- ``outside lesion``: outside a threshold segmentation (``lesion_mask``): Otsu on the blurred luminance, the dark
  vignette of a round field of view (dark regions touching a corner) left out of the threshold and the mask,
  closed, holes filled and opened (4 px at 224), then the largest dark component that reaches the central third
  (the one nearest the centre when none does). Images where it finds nothing, or where the two sides of the
  threshold differ by under MIN_GAP (15) luminance levels (a faint lesion: Otsu would split the lighting), are
  left out of that column (``no mask``).

``area outside`` (over the images of the ``outside lesion`` column) is the share of the image outside the mask:
what a uniform heatmap would put outside, the baseline a heatmap concentrated on the lesion should beat. ``mask
at CAM resolution, outside``: the share a heatmap exactly on the lesion would still put outside once drawn at
Grad-CAM's resolution (the mask averaged onto the 7x7 feature map, scaled back up as ``gradcam`` does): the
floor a 7x7 map can reach. ``> 0.5 outside disc``: how many images put most of their evidence outside the disc
(the tail a mean hides). ``dark corners``: how many images have a dark vignette (``vignette_mask``), the
artefact the ``shortcuts`` augmentation draws. ``no heatmap``: images whose heatmap is all zero (no evidence for
the target; common with ``--target malignant`` on benign images), left out of every mean.

Means with a 95% percentile-bootstrap CI per set and class, printed as markdown; ``--json`` writes them and the
per-image rows. ``--sheet FOLDER`` (outside the repository) writes a contact sheet per set and class: image,
heatmap, the mask (green) and disc (yellow); the most off-disc evidence first unless ``--sheet-order sample``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lesionlab.data.dataset import load_dataset
from lesionlab.data.images import open_image
from lesionlab.data.sample import Sample
from lesionlab.data.sources import load_external
from lesionlab.inference.explain import TARGETS, Explainer, blend

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CLASSES = ("benign", "malignant")
MIN_GAP = 15  # luminance levels between the dark and light sides of the threshold, below which there is no mask
VIGNETTE_LEVEL = 40  # luminance (0-255) below which a region touching a corner is the field of view's dark edge


# ------------------------------------------------------------------ masks


def disc_mask(size: int, radius: float) -> np.ndarray:
    """True inside the centred disc of ``radius`` x the side."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (radius * size) ** 2


def vignette_mask(lum: np.ndarray) -> np.ndarray:
    """True on the dark corners of a round field of view: regions darker than VIGNETTE_LEVEL touching a corner."""
    from scipy import ndimage

    labels, _ = ndimage.label(lum < VIGNETTE_LEVEL)
    k = max(2, min(lum.shape) // 32)  # a corner patch, so a dark rim a few pixels in still counts
    corners = np.concatenate([labels[:k, :k], labels[:k, -k:], labels[-k:, :k], labels[-k:, -k:]], axis=None)
    dark = np.isin(labels, np.unique(corners[corners > 0]))
    # and the rim, where the field of view's edge fades from black to skin
    return ndimage.binary_dilation(dark, iterations=max(1, min(lum.shape) // 28)) if dark.any() else dark


def _luminance(image: np.ndarray) -> np.ndarray:
    """Blurred luminance (sigma 4 px at 224) of a uint8 H x W x 3 image."""
    from scipy import ndimage

    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return ndimage.gaussian_filter(grey, sigma=image.shape[0] / 56)


def lesion_mask(image: np.ndarray) -> np.ndarray | None:
    """A rough lesion mask of a uint8 H x W x 3 dermoscopy image (see the module docstring), or None."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    h, w, _ = image.shape
    lum = _luminance(image)
    fov = ~vignette_mask(lum)
    if fov.sum() < 0.2 * h * w or np.ptp(lum[fov]) < 1:
        return None
    t = threshold_otsu(lum[fov])
    dark = (lum < t) & fov
    if lum[fov & ~dark].mean() - lum[dark].mean() < MIN_GAP:  # too faint to threshold: Otsu splits the lighting
        return None
    step = max(1, h // 56)  # 4 px at 224: closes gaps in a textured lesion, then drops hair-thin strands
    dark = ndimage.binary_closing(dark, iterations=step, border_value=1) & fov
    dark = ndimage.binary_opening(ndimage.binary_fill_holes(dark), iterations=step)
    labels, count = ndimage.label(dark)
    if count == 0:
        return None
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    central = np.zeros((h, w), bool)
    central[h // 3 : h - h // 3, w // 3 : w - w // 3] = True
    reaching = np.unique(labels[central & (labels > 0)])
    if len(reaching):
        best = reaching[np.argmax(areas[reaching - 1])]
    else:  # nothing dark in the central third: the component whose nearest pixel is nearest the centre
        yy, xx = np.mgrid[0:h, 0:w]
        d = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
        best = min(range(1, count + 1), key=lambda i: d[labels == i].min())
    return labels == best


def coarse(mask: np.ndarray, grid: int) -> np.ndarray:
    """The mask as Grad-CAM could draw it: averaged onto its ``grid`` x ``grid`` feature map, then scaled back up
    as ``gradcam`` scales its maps (bicubic, clamped at 0, min-max to [0, 1])."""
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    cam = F.interpolate(F.adaptive_avg_pool2d(x, grid), size=mask.shape, mode="bicubic", align_corners=False)
    cam = cam[0, 0].clamp_min(0)
    span = float(cam.max() - cam.min())
    return ((cam - cam.min()) / span).numpy() if span > 0 else np.zeros(mask.shape, np.float32)


def outside_share(heatmap: np.ndarray, inside: np.ndarray) -> float | None:
    total = float(heatmap.sum())
    return None if total <= 0 else float(heatmap[~inside].sum()) / total


# ------------------------------------------------------------------ sets and measurement


def sample_sets(kaggle: Path, isic2018: Path, n: int, seed: int) -> dict[str, list[Sample]]:
    """``n`` images per class (all when fewer) of each set, a seeded choice."""
    sets = {
        "isic-kaggle test": load_dataset(kaggle).test,
        "isic2018-task3-test": load_external(f"{isic2018}?name=isic2018").test,
    }
    rng = np.random.default_rng(seed)
    out = {}
    for name, samples in sets.items():
        chosen: list[Sample] = []
        for label in (0, 1):
            pool = sorted((s for s in samples if s.label == label), key=lambda s: s.relpath)
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]
        out[name] = chosen
    return out


def measure(explainer: Explainer, sets: dict[str, list[Sample]], target: str, disc: float) -> list[dict]:
    rows = []
    for name, samples in sets.items():
        for s in samples:
            e = explainer.explain(open_image(s.path, s.relpath), target)
            mask = lesion_mask(e.image)
            heat = e.heatmap.astype(np.float64)
            lesion = None if mask is None else outside_share(heat, mask)
            area: float | None = None
            floor: float | None = None
            if mask is not None and lesion is not None:  # the baselines, over the images the CAM column has
                area = float(1 - mask.mean())
                floor = outside_share(coarse(mask, len(heat) // 32), mask)  # stride 32: the last feature map
            rows.append(
                {
                    "set": name,
                    "relpath": s.relpath,
                    "class": CLASSES[s.label],
                    "diagnosis": s.diagnosis,
                    "probability": e.prediction.probability,
                    "target": e.target,
                    "outside_disc": outside_share(heat, disc_mask(len(heat), disc)),
                    "outside_lesion": lesion,
                    "area_outside": area,
                    "coarse_outside": floor,
                    "_image": e.image,
                    "_heatmap": e.heatmap,
                    "dark_corners": bool(vignette_mask(_luminance(e.image)).any()),
                    "_mask": mask,
                }
            )
    return rows


def bootstrap_mean(values: list[float], n_resamples: int, seed: int) -> dict:
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"value": None, "ci95": [None, None], "n": 0}
    means = np.random.default_rng(seed).choice(v, (n_resamples, len(v))).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"value": float(v.mean()), "ci95": [float(lo), float(hi)], "n": len(v)}


def summarise(rows: list[dict], n_resamples: int, seed: int) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        for cls in CLASSES:
            part = [r for r in rows if r["set"] == name and r["class"] == cls]
            block: dict = {
                "set": name,
                "class": cls,
                "n": len(part),
                "no_heatmap": sum(r["outside_disc"] is None for r in part),
                "no_mask": sum(r["_mask"] is None for r in part),
                "dark_corners": sum(r["dark_corners"] for r in part),
                # the tail a mean hides: images whose evidence lies mostly off the disc
                "mostly_outside_disc": sum((r["outside_disc"] or 0) > 0.5 for r in part),
            }
            for key in ("outside_disc", "outside_lesion", "area_outside", "coarse_outside"):
                block[key] = bootstrap_mean([r[key] for r in part if r[key] is not None], n_resamples, seed)
            block["targets"] = {t: sum(r["target"] == t for r in part) for t in CLASSES}
            out.append(block)
    return out


def _fmt(b: dict) -> str:
    if b["value"] is None:
        return "-"
    return f"{b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]"


def markdown(blocks: list[dict], disc: float) -> str:
    lines = [
        f"| set | class | n | no heatmap | CAM outside disc r={disc} | > 0.5 outside disc | CAM outside lesion mask | "
        "area outside mask | mask at CAM resolution, outside | no mask | dark corners | "
        "explained as benign / malignant |",
        "|---|---|---:|---:|---|---:|---|---|---|---:|---:|---|",
    ]
    for b in blocks:
        t = b["targets"]
        lines.append(
            f"| {b['set']} | {b['class']} | {b['n']} | {b['no_heatmap']} | {_fmt(b['outside_disc'])} | "
            f"{b['mostly_outside_disc']} | "
            f"{_fmt(b['outside_lesion'])} | "
            f"{_fmt(b['area_outside'])} | {_fmt(b['coarse_outside'])} | {b['no_mask']} | {b['dark_corners']} | "
            f"{t['benign']} / {t['malignant']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ contact sheets


def _tile(row: dict, disc: float) -> Image.Image:
    img, heat, mask = row["_image"], row["_heatmap"], row["_mask"]
    size = img.shape[0]
    outlined = img.copy()
    if mask is not None:
        from scipy import ndimage

        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        outlined[edge] = (0, 255, 0)
    panel = Image.fromarray(np.concatenate([img, np.asarray(blend(img, heat)), outlined], axis=1))
    draw = ImageDraw.Draw(panel)
    r, c = disc * size, size / 2
    for left in (size, 2 * size):
        draw.ellipse((left + c - r, c - r, left + c + r, c + r), outline=(255, 255, 0))
    lesion = "-" if row["outside_lesion"] is None else f"{row['outside_lesion']:.2f}"
    draw.text((size + 4, 4), f"p={row['probability']:.2f} {row['target'][0]} disc {row['outside_disc']:.2f}", "white")
    draw.text((2 * size + 4, 4), f"lesion {lesion}", "white")
    return panel


def write_sheets(rows: list[dict], folder: Path, per_group: int, disc: float, order: str) -> list[Path]:
    folder = folder.expanduser().resolve()
    if folder == REPO or REPO in folder.parents:
        sys.exit(f"--sheet {folder} is inside the repository: lesion images go to a local folder such as /tmp")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in dict.fromkeys(r["set"] for r in rows):
        for cls in CLASSES:
            part = [r for r in rows if r["set"] == name and r["class"] == cls]
            if order == "outside":  # the most off-centre evidence first: where a shortcut would show
                part = sorted(part, key=lambda r: -1.0 if r["outside_disc"] is None else r["outside_disc"])[::-1]
            part = part[:per_group]
            if not part:
                continue
            tiles = [np.asarray(_tile(r, disc)) for r in part]
            path = folder / f"shortcuts_{name.split()[0]}_{cls}.png"
            Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="a run or ensemble folder (default: the bundled model)")
    ap.add_argument("--n", type=int, default=100, help="images per class and set")
    ap.add_argument("--seed", type=int, default=0, help="of the sample and the bootstrap")
    ap.add_argument("--disc", type=float, default=0.4, help="radius of the central disc, as a share of the side")
    ap.add_argument("--target", choices=TARGETS, default="predicted", help="whose evidence the heatmap shows")
    ap.add_argument("--kaggle", type=Path, default=DATA / "isic-kaggle")
    ap.add_argument("--isic2018", type=Path, default=DATA / "isic2018-task3-test")
    ap.add_argument("--n-resamples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no stalls on a CPU shared with training)")
    ap.add_argument("--json", type=Path, help="write the summary and the per-image rows here")
    ap.add_argument("--sheet", type=Path, help="a folder outside the repository for contact sheets")
    ap.add_argument("--sheet-n", type=int, default=4, help="images per set and class on the contact sheets")
    ap.add_argument(
        "--sheet-order",
        choices=("outside", "sample"),
        default="outside",
        help="outside: the images with the most evidence off the disc first; sample: the sample's order",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    explainer = Explainer(args.model_dir)
    sets = sample_sets(args.kaggle, args.isic2018, args.n, args.seed)
    rows = measure(explainer, sets, args.target, args.disc)
    blocks = summarise(rows, args.n_resamples, args.seed)
    took = time.perf_counter() - t0
    print(f"model {explainer.model_dir} (explained: {explainer.run_dir.name}), target {args.target}, seed {args.seed}")
    print(markdown(blocks, args.disc))
    print(f"\n{len(rows)} images in {took:.0f} s")
    if args.json:
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        meta = {"model_dir": str(explainer.model_dir), "target": args.target, "disc": args.disc, "seed": args.seed}
        args.json.write_text(json.dumps({**meta, "summary": blocks, "images": public}, indent=1))
    if args.sheet:
        for p in write_sheets(rows, args.sheet, args.sheet_n, args.disc, args.sheet_order):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
