"""The folder dataset: its samples, optional near-duplicate groups and leaked-test lists.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from lesionlab.data.sample import Sample
from lesionlab.data.splits import split_train_val
from lesionlab.errors import DataError

DEFAULT_CLASSES = ("benign", "malignant")
SPLITS = ("train", "val", "test", "test_dedup")
SHARED_DATA = Path("../shared/data/isic-kaggle")


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

    def without(self, relpaths: set[str]) -> Dataset:
        keep = lambda xs: [s for s in xs if s.relpath not in relpaths]
        return Dataset(self.root, self.classes, keep(self.train), keep(self.test), self.groups, self.leaked)

    def splits(
        self, seed: int = 0, val_fraction: float = 0.2, fold: int = 0, also_fold: int | None = None
    ) -> dict[str, list[Sample]]:
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
    repo = Path(__file__).resolve().parents[3]  # src/lesionlab/data/dataset.py -> the repository
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
    # tuple(): callers may pass the list read from a config.json; it holds the two class names
    pair = cast(tuple[str, str], tuple(classes))
    return Dataset(root, pair, parts["train"], parts["test"], read_near_duplicate_groups(root), read_leaked(root))


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
