"""The folder layout (train|test x class folders, the isic-kaggle set): ``data.dataset.load_dataset`` as an adapter."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from lesionlab.data.dataset import load_dataset
from lesionlab.data.formats.base import ReadOptions, SourceRead


class FolderFormat:
    name = "folder"
    expects = (
        "train/<benign>/*.jpg, train/<malignant>/*.jpg, test/<benign>/*.jpg, test/<malignant>/*.jpg "
        "(class folder names configurable), optional near_duplicate_groups.csv and test_leaked_from_train.txt"
    )

    def detect(self, root: Path) -> bool:
        return (root / "train").is_dir() and (root / "test").is_dir()

    def read(self, root: Path, options: ReadOptions) -> SourceRead:
        """Relpaths exactly as ``load_dataset`` gives them ("test/benign/100.jpg"); split fixed by the folder."""
        ds = load_dataset(root, options.classes)
        samples = [dataclasses.replace(s, split="train") for s in ds.train]
        samples += [dataclasses.replace(s, split="test") for s in ds.test]
        return SourceRead(self.name, samples, groups=near_duplicate_group_lists(root), leaked=ds.leaked)


def near_duplicate_group_lists(root: Path) -> list[list[str]]:
    """The groups of ``near_duplicate_groups.csv`` as lists of relpaths, in the file's order."""
    path = root / "near_duplicate_groups.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [row["files"].split() for row in csv.DictReader(f)]
