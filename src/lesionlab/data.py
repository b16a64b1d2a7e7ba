"""The folder dataset: discovery, group-aware splits and safe image decoding.

Layout expected under a data root::

    train/benign/*.jpg   train/malignant/*.jpg
    test/benign/*.jpg    test/malignant/*.jpg

Malignant is the positive class (label 1). Optional files beside the folders:
``near_duplicate_groups.csv`` (keeps each near-duplicate group on one side of the
train/validation split) and ``test_leaked_from_train.txt`` (test files removed for
``test_dedup``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_CLASSES = ("benign", "malignant")
#: Formats we decode; anything else is refused rather than handed to an exotic Pillow plugin.
SAFE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")  # JPEG also opens MPO phone photos
#: 64 megapixels: a 48 MP phone photo passes, a decompression bomb does not.
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 32
SPLITS = ("train", "val", "test", "test_dedup")
SHARED_DATA = Path("../shared/data/isic-kaggle")


class DataError(ValueError):
    """The data folder is not laid out as expected."""


class BadImageError(ValueError):
    """One image cannot be used; ``reason`` says why and ``status`` maps it to HTTP."""

    def __init__(self, path: str, reason: str, status: int = 415):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Sample:
    relpath: str  # posix path relative to the data root, e.g. "test/benign/100.jpg"
    path: Path
    label: int  # 1 = malignant


@dataclass
class Dataset:
    root: Path
    classes: tuple[str, str]
    train: list[Sample]
    test: list[Sample]
    groups: dict[str, int] = field(default_factory=dict)
    leaked: frozenset[str] = frozenset()

    @property
    def all(self) -> list[Sample]:
        return self.train + self.test

    def file_list_hash(self) -> str:
        """Identifies the exact files (name, size, mtime) so caches and runs notice a changed dataset."""
        h = hashlib.sha256()
        for s in sorted(self.all, key=lambda s: s.relpath):
            st = s.path.stat()
            h.update(f"{s.relpath}\t{s.label}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
        return h.hexdigest()

    def without(self, relpaths: set[str]) -> "Dataset":
        keep = lambda xs: [s for s in xs if s.relpath not in relpaths]  # noqa: E731
        return Dataset(self.root, self.classes, keep(self.train), keep(self.test), self.groups, self.leaked)

    def splits(self, seed: int = 0, val_fraction: float = 0.2, fold: int = 0,
               also_fold: int | None = None) -> dict[str, list[Sample]]:
        train, val = split_train_val(self.train, self.groups, seed, val_fraction, fold, also_fold)
        test_dedup = [s for s in self.test if s.relpath not in self.leaked]
        return {"train": train, "val": val, "test": list(self.test), "test_dedup": test_dedup}


LAYOUT_HELP = (
    "Expected a folder laid out as train/<benign>/*.jpg, train/<malignant>/*.jpg, "
    "test/<benign>/*.jpg, test/<malignant>/*.jpg (class folder names set with --classes). "
    "Get the Kaggle set 'Skin Cancer: Malignant vs. Benign' and point --data or LESIONLAB_DATA at it."
)


def default_data_dir() -> Path | None:
    """``LESIONLAB_DATA``, else ``../shared/data/isic-kaggle`` from the working directory or the repo."""
    env = os.environ.get("LESIONLAB_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]  # src/lesionlab/data.py -> the repository
    candidates = [Path.cwd() / SHARED_DATA, repo / SHARED_DATA]
    for c in candidates:
        if (c / "train").is_dir():
            return c.resolve()
    return None


def _list_class(root: Path, split: str, cls: str, label: int) -> list[Sample]:
    folder = root / split / cls
    if not folder.is_dir():
        raise DataError(f"missing class folder {folder}. {LAYOUT_HELP}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [Sample(p.relative_to(root).as_posix(), p, label) for p in files]


def load_dataset(root: str | Path, classes: tuple[str, str] = DEFAULT_CLASSES) -> Dataset:
    """Lists the dataset's files; raises ``DataError`` with the expected layout when it is wrong."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. {LAYOUT_HELP}")
    parts: dict[str, list[Sample]] = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no '{split}' folder. {LAYOUT_HELP}")
        parts[split] = [s for label, cls in enumerate(classes) for s in _list_class(root, split, cls, label)]
        for label, cls in enumerate(classes):
            if not any(s.label == label for s in parts[split]):
                raise DataError(f"{root / split / cls} holds no files. {LAYOUT_HELP}")
    return Dataset(root, tuple(classes), parts["train"], parts["test"],
                   read_near_duplicate_groups(root), read_leaked(root))


def read_near_duplicate_groups(root: Path) -> dict[str, int]:
    path = root / "near_duplicate_groups.csv"
    if not path.exists():
        return {}
    groups: dict[str, int] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for rel in row["files"].split():
                groups[rel] = int(row["group"])
    return groups


def read_leaked(root: Path) -> frozenset[str]:
    path = root / "test_leaked_from_train.txt"
    if not path.exists():
        return frozenset()
    return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())


def n_folds(val_fraction: float) -> int:
    """How many disjoint validation folds a validation fraction makes (0.2 -> 5)."""
    return max(2, round(1 / val_fraction))


def check_fold(fold: int, val_fraction: float, also_fold: int | None = None) -> None:
    n = n_folds(val_fraction)
    for name, k in (("fold", fold), ("also-val-fold", also_fold)):
        if k is not None and not 0 <= k < n:
            raise DataError(f"{name} must be in 0..{n - 1} (validation fraction {val_fraction} makes {n} folds), "
                            f"got {k}")
    if also_fold == fold:
        raise DataError(f"also-val-fold must differ from fold ({fold}): it is a second validation fold")


def split_train_val(
    samples: list[Sample], groups: dict[str, int], seed: int, val_fraction: float = 0.2, fold: int = 0,
    also_fold: int | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Seeded, stratified split in which a near-duplicate group never straddles train and validation.

    The validation part is fold ``fold`` of ``n_folds(val_fraction)`` group-aware folds; fold 0 is the default
    split. Runs on every fold of one seed see each training image in validation exactly once, which is what a
    cross-fitted ensemble needs (its threshold and temperature are fitted on all of train, out of fold).
    ``also_fold`` validates on a second fold too (training on the rest): the inner runs of a nested cross-fit.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    check_fold(fold, val_fraction, also_fold)
    labels = np.array([s.label for s in samples])
    # Files outside any listed group form a group of their own.
    offset = max(groups.values(), default=-1) + 1
    group_ids = np.array([groups.get(s.relpath, offset + i) for i, s in enumerate(samples)])
    splitter = StratifiedGroupKFold(n_splits=n_folds(val_fraction), shuffle=True, random_state=seed)
    held_out = {fold} if also_fold is None else {fold, also_fold}
    val_idx = {int(i) for k, (_, idx) in enumerate(splitter.split(np.zeros(len(samples)), labels, group_ids))
               if k in held_out for i in idx}
    return ([s for i, s in enumerate(samples) if i not in val_idx],
            [s for i, s in enumerate(samples) if i in val_idx])


# ---------------------------------------------------------------- decoding


def open_image(source: str | Path | bytes, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE) -> Image.Image:
    """Decodes a file or bytes into an upright RGB image, or raises ``BadImageError`` saying why."""
    label = name or (str(source) if not isinstance(source, bytes) else "<image>")
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(label, "empty (0 bytes)", 400)
        fp: object = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise BadImageError(label, "file not found", 404)
        if path.stat().st_size == 0:
            raise BadImageError(label, "empty file (0 bytes)", 415)
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=SAFE_FORMATS)  # type: ignore[arg-type]
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(label, f"{w}x{h} pixels exceeds the cap of {max_pixels:,} pixels", 413)
            img.load()
    except BadImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise BadImageError(label, f"not an image in a supported format ({', '.join(SAFE_FORMATS)})") from None
        raise BadImageError(label, f"image exceeds the cap of {max_pixels:,} pixels (decompression-bomb guard: "
                                   f"{e})", 413) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(label, f"corrupt or truncated image ({e})") from None
    if min(img.size) < min_side:
        raise BadImageError(label, f"too small ({img.size[0]}x{img.size[1]}); need at least "
                                   f"{min_side}x{min_side} pixels", 422)
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Flattens transparency onto white (a lesion photo has no meaningful alpha) and drops palettes."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _to_8bit(img)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Rescales 16-bit, 32-bit and float greyscale to "L": ``convert`` would clip them, mostly to white.

    I;16*: /257. I: clipped to 0..65535, then /257 unless it already fits 0..255. F: [0,1] x 255 when its
    maximum is at most 1, else clipped to 0..255 (NaN counts as 0).
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        a = np.clip(a, 0, 1) * 255 if a.max(initial=0) <= 1 else np.clip(a, 0, 255)
    else:
        a = np.clip(a, 0, 65535)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257
    return Image.fromarray(np.round(a).astype(np.uint8), "L")


def resize_to_input(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size``, then a centre crop: uint8 HxWx3. Square images are simply resized.

    Only the source region under the crop is resampled (Pillow's ``box``), so a 200000x32 strip costs what a
    square does instead of gigabytes; on photos this matches resizing the whole image and cropping to within
    two grey levels (Pillow rounds between its two passes, and may order them differently).
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) == (w, h):
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def normalize(batch_hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 NxHxWx3 -> float32 Nx3xHxW, scaled to [0,1] then standardised."""
    x = batch_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass
class DecodedSet:
    images: np.ndarray  # uint8 NxHxWx3
    samples: list[Sample]
    bad: list[BadImageError]


def decode_samples(samples: list[Sample], size: int, progress: bool = True,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedSet:
    """Decodes every sample once; collects the bad ones instead of stopping at the first."""
    from tqdm.auto import tqdm

    good, arrays, bad = [], [], []
    for s in tqdm(samples, desc=f"decode {size}px", disable=not progress, unit="img"):
        try:
            arrays.append(resize_to_input(open_image(s.path, s.relpath, max_pixels), size))
            good.append(s)
        except BadImageError as e:
            bad.append(e)
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return DecodedSet(images, good, bad)


def describe_bad(bad: list[BadImageError], limit: int = 20) -> str:
    lines = [f"  {e.path}: {e.reason}" for e in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
