"""One labelled image of a dataset: the row of the dataset table that every adapter produces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """``relpath`` identifies the image within its dataset: the path relative to its source's root (e.g.
    "test/benign/100.jpg"), prefixed by the source's name and a slash when a dataset unites several sources
    ("ham10000/images/ISIC_0024306.jpg"). ``label`` is 1 for malignant. The other fields are what a source
    knows: ``diagnosis`` as a taxonomy code (``data.taxonomy``), the ids that group images of one lesion or one
    patient, the source's name, the split a source fixes (``"train"`` or ``"test"``; None: any) and metadata
    columns as (name, value) pairs."""

    relpath: str
    path: Path
    label: int
    diagnosis: str | None = None
    lesion_id: str | None = None
    patient_id: str | None = None
    source: str = ""
    split: str | None = None
    meta: tuple[tuple[str, str], ...] = ()
