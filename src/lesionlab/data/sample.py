"""One labelled image of a dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    relpath: str  # posix path relative to the data root, e.g. "test/benign/100.jpg"
    path: Path
    label: int  # 1 = malignant
