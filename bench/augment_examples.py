"""What finetune's augmentations do to real images, and what they cost.

Usage: python bench/augment_examples.py [--data DIR] [--augment SPEC ...] [--n 8] [--seed 0] [--out FOLDER]
                                        [--time] [--batch 32] [--size 224] [--threads 1]

``--out`` writes one contact sheet per augmentation (``FOLDER/augment_<spec>.png``: the first row the images as
decoded, each row under it one seeded draw) for eyeballing. FOLDER must be outside the repository (lesion
images are never written into it), e.g. /tmp/augment. ``--time`` prints a markdown table of the time per batch
of ``--batch`` images at ``--size`` px for each augmentation, the minimum and median of 10 batches after one
warm-up, with the extras' cost over plain ``dermoscopy``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lesionlab.data.dataset import load_dataset
from lesionlab.data.images import decode_samples
from lesionlab.training.augment import augment_batch
from lesionlab.training.augment_names import canonical_augment

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic-kaggle"
SPECS = (
    "dermoscopy",
    "dermoscopy+shortcuts",
    "dermoscopy+color",
    "dermoscopy+aspect",
    "dermoscopy+shortcuts+color+aspect",
)


def outside_repo(folder: Path) -> Path:
    folder = folder.expanduser().resolve()
    if folder == REPO or REPO in folder.parents:
        sys.exit(f"--out {folder} is inside the repository: lesion images go to a local folder such as /tmp")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sample_images(data: Path, n: int, size: int, seed: int) -> np.ndarray:
    """``n`` test images (half benign, half malignant, a seeded choice) decoded at ``size``: uint8 N x H x W x 3."""
    test = load_dataset(data).test
    rng = np.random.default_rng(seed)
    chosen = []
    for label in (0, 1):
        pool = [s for s in test if s.label == label]
        chosen += [pool[i] for i in rng.choice(len(pool), (n + 1 - label) // 2, replace=False)]
    return decode_samples(chosen, size, progress=False).images


def contact_sheet(images: np.ndarray, spec: str, rows: int, seed: int) -> Image.Image:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.manual_seed(seed)
    grid = [images] + [augment_batch(x, images.shape[1], spec).permute(0, 2, 3, 1).numpy() for _ in range(rows)]
    return Image.fromarray(np.concatenate([np.concatenate(list(r), axis=1) for r in grid], axis=0))


def time_specs(specs: list[str], batch: int, size: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    times: dict[str, list[float]] = {s: [] for s in specs}
    for s in specs:
        augment_batch(x, size, s)  # warm-up
    for _ in range(10):  # interleaved, so a change in the machine's load falls on every spec alike
        for s in specs:
            t0 = time.perf_counter()
            augment_batch(x, size, s)
            times[s].append(time.perf_counter() - t0)
    base = min(times["dermoscopy"]) if "dermoscopy" in times else None
    lines = [
        f"| augment (batch {batch}, {size} px, {torch.get_num_threads()} thread(s)) | min ms | median ms | "
        "over dermoscopy (min) |",
        "|---|---:|---:|---:|",
    ]
    for s, v in times.items():
        over = "" if base is None or s == "dermoscopy" else f"{(min(v) - base) * 1000:+.1f} ms"
        lines.append(f"| {s} | {min(v) * 1000:.1f} | {statistics.median(v) * 1000:.1f} | {over} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a train/test x benign/malignant folder")
    ap.add_argument("--augment", nargs="+", default=list(SPECS), help="augmentations (TrainConfig.augment)")
    ap.add_argument("--n", type=int, default=8, help="images per contact sheet (half of each class)")
    ap.add_argument("--rows", type=int, default=4, help="augmented draws per contact sheet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, help="folder outside the repository for the contact sheets")
    ap.add_argument("--time", action="store_true", help="print the cost per batch of each augmentation")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (finetune's loader shares the CPU)")
    args = ap.parse_args(argv)
    try:
        specs = [canonical_augment(s) for s in args.augment]
    except ValueError as e:
        sys.exit(str(e))
    torch.set_num_threads(args.threads)
    if args.out:
        out = outside_repo(args.out)
        images = sample_images(args.data, args.n, args.size, args.seed)
        for s in specs:
            path = out / f"augment_{s.replace('+', '_')}.png"
            contact_sheet(images, s, args.rows, args.seed).save(path)
            print(f"wrote {path}")
    if args.time:
        print(time_specs(specs, args.batch, args.size, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
