"""A synthetic, reproducible set of skin-like JPEGs in lesionlab's folder layout, for timing and memory benchmarks.

Usage: python bench/make_images.py OUT [--n 30000] [--size 384] [--workers 2] [--seed 0] [--distinct K] [--quiet]

Writes ``OUT/train/{benign,malignant}/*.jpg`` and ``OUT/test/{benign,malignant}/*.jpg``: 90% train, 10% test,
half of each per class, named by their index (``00000.jpg`` ...). Each image is SIZE x SIZE RGB, quality 90: a
pinkish-brown skin background (smooth shading, fine noise) with a darker blob (a rotated ellipse with an uneven
edge, its own colour and texture; malignant blobs are darker and more irregular). Image ``i`` depends only on
``(seed, i)``, so the set is the same on every machine. The images are for timing, not for learning anything.

``OUT/.made.json`` records n, size and seed once every image is written; a second call with the same values and
the same number of images on disk does nothing. Also importable: ``make_images(out, n, size, workers)``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

MARKER = ".made.json"
SPLITS = ("train", "test")
CLASSES = ("benign", "malignant")
TEST_SHARE = 0.1
QUALITY = 90
VERSION = 1  # bump when the pictures change, so that old sets are regenerated


def layout(n: int) -> tuple[int, int]:
    """(train images, name width): the first n_train indices are train, the rest test."""
    n_test = max(2, round(n * TEST_SHARE)) if n >= 4 else 0
    return n - n_test, max(5, len(str(max(n - 1, 0))))


def place(index: int, n_train: int) -> tuple[str, str]:
    """(split, class) of image ``index``: classes alternate, so each split is half benign, half malignant."""
    return ("train" if index < n_train else "test"), CLASSES[index % 2]


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a cells x cells random grid upsampled bicubically to size x size."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img), -1.0, 1.0)


def picture(index: int, size: int, malignant: bool, seed: int = 0) -> Image.Image:
    """Image ``index``: skin background, a darker lesion blob, noise. Deterministic in (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j].astype(np.float32)

    # skin: a pink-to-tan base colour, a linear light gradient, smooth blotches, a mild dark vignette
    base = np.array([rng.uniform(185, 235), rng.uniform(125, 180), rng.uniform(105, 160)], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    shade = (xx * math.cos(angle) + yy * math.sin(angle)) * rng.uniform(5, 20)
    blotch = smooth_noise(rng, size, 6) * rng.uniform(4, 12)
    vignette = -rng.uniform(0, 40) * np.clip(xx**2 + yy**2 - 0.8, 0, None)
    skin = base + (shade + blotch + vignette)[..., None]

    # lesion: a rotated ellipse whose radius wobbles with the angle (more for malignant), soft-edged
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    ax, ay = rng.uniform(0.15, 0.45, 2)
    rot = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
    v = -(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    theta = np.arctan2(v, u)
    wobble = np.zeros_like(r)
    for k in range(2, 7):
        amp = rng.uniform(0, 0.12 if malignant else 0.05)
        wobble += amp * np.sin(k * theta + rng.uniform(0, 2 * math.pi))
    edge = rng.uniform(0.05, 0.25)
    alpha = np.clip((1.0 + wobble - r) / edge, 0.0, 1.0)

    dark = rng.uniform(0.35, 0.6) if malignant else rng.uniform(0.5, 0.8)
    tint = np.array([rng.uniform(0.75, 1.0), rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.6)], dtype=np.float32)
    lesion = base * dark * tint * (1.0 + 0.15 * smooth_noise(rng, size, 12))[..., None]
    if malignant:  # an off-centre darker core
        core = np.clip((0.5 - np.hypot(u / ax - 0.2, v / ay + 0.1)) / 0.2, 0.0, 1.0)
        lesion *= (1.0 - 0.35 * core)[..., None]

    out = skin * (1.0 - alpha[..., None]) + lesion * alpha[..., None]
    out += 4.0 * rng.standard_normal(out.shape, dtype=np.float32)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(radius=0.6 * size / 384))


def image_path(index: int, out: Path, n_train: int, width: int) -> Path:
    split, cls = place(index, n_train)
    return out / split / cls / f"{index:0{width}d}.jpg"


def write_one(index: int, out: Path, size: int, n_train: int, width: int, seed: int) -> int:
    """Writes image ``index`` into its split and class folder; returns its bytes."""
    _, cls = place(index, n_train)
    path = image_path(index, out, n_train, width)
    picture(index, size, cls == "malignant", seed).save(path, format="JPEG", quality=QUALITY)
    return path.stat().st_size


def existing_images(out: Path) -> list[Path]:
    return [p for s in SPLITS for c in CLASSES if (out / s / c).is_dir() for p in (out / s / c).glob("*.jpg")]


def is_made(out: Path, n: int, size: int, seed: int, distinct: int | None = None) -> bool:
    """The marker says (n, size, seed, distinct, version) and exactly n images are there."""
    try:
        made = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    wanted = {"n": n, "size": size, "seed": seed, "distinct": distinct or n, "version": VERSION}
    return all(made.get(k) == v for k, v in wanted.items()) and len(existing_images(out)) == n


def total_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in existing_images(out))


def make_images(
    out: Path,
    n: int,
    size: int = 384,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    distinct: int | None = None,
) -> Path:
    """Generates the set in ``out`` (created) unless it is already there; returns ``out``.

    ``distinct`` (even; default ``n``): only the first ``distinct`` pictures are drawn, and image ``i`` beyond them
    is a byte copy of image ``i % distinct`` (same class) in its own file: as costly to decode, store and cache as
    a distinct picture, at a fraction of the drawing time (for memory and throughput benchmarks, where the pixels
    do not matter). An incomplete or different set in ``out`` is replaced: its JPEGs in the four class folders are
    removed (nothing else in ``out`` is touched) and the marker is written last."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (one image per class), got {n}")
    distinct = min(distinct or n, n)
    if distinct < n and distinct % 2:
        raise ValueError(f"distinct must be even (copies keep their class), got {distinct}")
    out = Path(out)
    if is_made(out, n, size, seed, distinct):
        return out
    (out / MARKER).unlink(missing_ok=True)
    for p in existing_images(out):
        p.unlink()
    for s in SPLITS:
        for c in CLASSES:
            (out / s / c).mkdir(parents=True, exist_ok=True)
    n_train, width = layout(n)
    job = partial(write_one, out=out, size=size, n_train=n_train, width=width, seed=seed)
    bar = tqdm(total=n, unit="img", desc=f"images -> {out}", disable=not progress)
    written = 0
    if workers <= 1:
        for i in range(distinct):
            written += job(i)
            bar.update()
    else:
        with Pool(workers) as pool:
            for nbytes in pool.imap_unordered(job, range(distinct), chunksize=32):
                written += nbytes
                bar.update()
    for i in range(distinct, n):
        dst = image_path(i, out, n_train, width)
        shutil.copyfile(image_path(i % distinct, out, n_train, width), dst)
        written += dst.stat().st_size
        bar.update()
    bar.close()
    made = {"n": n, "size": size, "seed": seed, "distinct": distinct, "version": VERSION}
    made |= {"train": n_train, "test": n - n_train}
    (out / MARKER).write_text(json.dumps({**made, "bytes": written}, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="Folder to write (kept; regenerated only if n, size or seed differ).")
    ap.add_argument("--n", type=int, default=30000, help="Number of images (90%% train, 10%% test).")
    ap.add_argument("--size", type=int, default=384, help="Side of each square image in pixels.")
    ap.add_argument("--workers", type=int, default=1, help="Processes generating images.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the whole set (image i uses (seed, i)).")
    ap.add_argument(
        "--distinct", type=int, default=None, help="Draw only this many pictures (even); the rest are copies of them."
    )
    ap.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = ap.parse_args()
    already = is_made(args.out, args.n, args.size, args.seed, args.distinct)
    out = make_images(
        args.out, args.n, args.size, args.workers, args.seed, progress=not args.quiet, distinct=args.distinct
    )
    state = "already there" if already else "written"
    print(f"{out.resolve()}: {args.n} images of {args.size}x{args.size} ({state}), {total_bytes(out)} bytes")


if __name__ == "__main__":
    main()
