"""The folder dataset: its samples, optional near-duplicate groups and leaked-test lists.

Layout expected under a data root::

    train/benign/*.jpg   train/malignant/*.jpg
    test/benign/*.jpg    test/malignant/*.jpg

Malignant is the positive class (label 1). Optional files beside the folders:
``near_duplicate_groups.csv`` (keeps each near-duplicate group on one side of the
train/validation split) and ``test_leaked_from_train.txt`` (test files removed for
``test_dedup``).

A dataset may also unite several sources (``data.sources.load_sources``): ``sources`` then describes each one
(name, root, format, counts), relpaths carry the source's name as a prefix and ``splits`` adds each source's own
test split. ``load_dataset`` is the one-source, folder-layout case and stays exactly as it was.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lesionlab.data.sample import Sample
from lesionlab.data.splits import split_train_val
from lesionlab.errors import DataError

DEFAULT_CLASSES = ("benign", "malignant")
SPLITS = ("train", "val", "test", "test_dedup")
SHARED_DATA = Path("../shared/data/isic-kaggle")


@dataclass(frozen=True)
class Skipped:
    """An image or row left out because ``skip_invalid`` (or a similar flag) allowed it, and why."""

    item: str
    reason: str


@dataclass(frozen=True)
class SourceInfo:
    """One source of a dataset: its name (the relpath prefix when there are several), folder, format, the
    spec it was named by, and its counts at load time: split ("train", "test" or "pool": no fixed split) ->
    class name -> images."""

    name: str
    root: Path
    format: str
    spec: str = ""
    split_counts: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: dict(by_class) for split, by_class in self.split_counts}

    @staticmethod
    def count(samples: list[Sample], classes: tuple[str, str]) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
        """``split_counts`` of samples: by their fixed split (None counts as "pool"), then by class."""
        n = Counter((s.split or "pool", classes[s.label]) for s in samples)
        splits = sorted({k for k, _ in n}, key=("train", "test", "pool").index)
        return tuple((sp, tuple((c, n[sp, c]) for c in classes)) for sp in splits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "format": self.format,
            "spec": self.spec,
            "counts": self.counts(),
        }


@dataclass
class Dataset:
    """The dataset table: ``train`` is the training pool (validation is carved from it by ``splits``), ``test``
    the fixed test images. ``groups`` maps relpaths to a group id (images of one lesion, patient or near-duplicate
    group; never split across train and validation), ``leaked`` the test relpaths that ``test_dedup`` drops.
    ``sources`` describes where the samples came from; ``skipped`` what loading left out, and why;
    ``duplicate_pairs`` how many cross-source duplicate pairs were linked into groups."""

    root: Path
    classes: tuple[str, str]
    train: list[Sample]
    test: list[Sample]
    groups: dict[str, int] = field(default_factory=dict)
    leaked: frozenset[str] = frozenset()
    sources: list[SourceInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    duplicate_pairs: int = 0

    @property
    def all(self) -> list[Sample]:
        return self.train + self.test

    def file_list_hash(self, mtimes: bool = True) -> str:
        """Identifies the files by name, label, size and (``mtimes``) modification time. Caches key on all four,
        so that a file rewritten in place is read again; a run's identity leaves the mtimes out
        (``mtimes=False``), so that a run resumes on a copy of its data (a restored backup, a container's fresh
        copy) whose files are the same but newly written."""
        h = hashlib.sha256()
        for s in sorted(self.all, key=lambda s: s.relpath):
            st = s.path.stat()
            stamp = f"\t{int(st.st_mtime)}" if mtimes else ""
            h.update(f"{s.relpath}\t{s.label}\t{st.st_size}{stamp}\n".encode())
        return h.hexdigest()

    def without(self, relpaths: set[str]) -> Dataset:
        keep = lambda xs: [s for s in xs if s.relpath not in relpaths]
        return Dataset(
            self.root,
            self.classes,
            keep(self.train),
            keep(self.test),
            self.groups,
            self.leaked,
            self.sources,
            self.skipped,
            self.duplicate_pairs,
        )

    def splits(
        self, seed: int = 0, val_fraction: float = 0.2, fold: int = 0, also_fold: int | None = None
    ) -> dict[str, list[Sample]]:
        """train/val (the seeded, group-aware split of the pool), test and test_dedup; with several sources also
        ``test:<source>`` and ``test_dedup:<source>`` for each source that fixes test images."""
        train, val = split_train_val(self.train, self.groups, seed, val_fraction, fold, also_fold)
        return {"train": train, "val": val, **self.test_splits()}

    def test_splits(self) -> dict[str, list[Sample]]:
        """test and test_dedup; with several sources also ``test:<source>`` and ``test_dedup:<source>``."""
        test_dedup = [s for s in self.test if s.relpath not in self.leaked]
        out = {"test": list(self.test), "test_dedup": test_dedup}
        if len(self.sources) > 1:
            for info in self.sources:
                own = [s for s in self.test if s.source == info.name]
                if own:  # a source without a fixed test split has nothing to score here
                    out[f"test:{info.name}"] = own
                    out[f"test_dedup:{info.name}"] = [s for s in own if s.relpath not in self.leaked]
        return out

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Images now in the table: source name ("" for an unnamed one) -> "train"/"test" -> class -> n."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for part, samples in (("train", self.train), ("test", self.test)):
            for s in samples:
                by_class = out.setdefault(s.source, {}).setdefault(part, dict.fromkeys(self.classes, 0))
                by_class[self.classes[s.label]] += 1
        return out


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
    info = SourceInfo(root.name, root, "folder", str(root), folder_counts(parts, pair))
    return Dataset(
        root, pair, parts["train"], parts["test"], read_near_duplicate_groups(root), read_leaked(root), [info]
    )


def folder_counts(parts: dict[str, list[Sample]], classes: tuple[str, str]):
    """``SourceInfo.split_counts`` of a folder layout, whose samples carry no split of their own."""
    return tuple(
        (split, tuple((c, sum(s.label == k for s in parts[split])) for k, c in enumerate(classes)))
        for split in ("train", "test")
    )


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
