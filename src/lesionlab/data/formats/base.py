"""What every format adapter shares: its contract, its read options and result, CSV and image-folder helpers,
and the collector that turns bad rows into one ``DataError`` naming them (or into ``Skipped`` rows)."""

from __future__ import annotations

import csv
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lesionlab.data.dataset import DEFAULT_CLASSES, Skipped
from lesionlab.data.sample import Sample
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from lesionlab.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# provenance files the shared data folders carry: never a label file
NOT_LABEL_FILES = frozenset({"manifest.csv", "near_duplicate_groups.csv", "near_duplicate_pairs.csv"})
SHOWN = 10  # rows named in one error message


@dataclass(frozen=True)
class ReadOptions:
    """How to read one source. ``skip_invalid`` skips bad rows (each listed with its reason) instead of raising;
    ``skip_unlisted`` skips images present in an image folder but absent from the label file; ``allow_unknown``
    skips ISIC rows of no class or UNK. ``options`` are the spec's ``key=value`` pairs (e.g. the generic CSV's
    column names, ``file=`` the label file, ``images=`` the image folder)."""

    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    classes: tuple[str, str] = DEFAULT_CLASSES
    skip_invalid: bool = False
    skip_unlisted: bool = False
    allow_unknown: bool = False
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass
class SourceRead:
    """One source as read: ``samples`` with relpaths relative to its root (``source`` unset), what was skipped,
    the near-duplicate groups it ships (lists of relpaths), its leaked test relpaths, and ``global_ids``: whether
    its lesion/patient/image ids are ISIC-Archive-wide (shared by every ISIC-derived set) rather than its own.
    ``image_ids`` maps relpaths to those image ids (ISIC_0024306) for linking the same image across sources."""

    format: str
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    leaked: frozenset[str] = frozenset()
    global_ids: bool = False
    image_ids: dict[str, str] = field(default_factory=dict)


class Format(Protocol):
    """An adapter: ``name`` (the spec prefix), ``expects`` (one line naming the files it reads, for errors),
    ``detect(root)`` (whether a folder looks like this format) and ``read(root, options)``."""

    name: str
    expects: str

    def detect(self, root: Path) -> bool: ...

    def read(self, root: Path, options: ReadOptions) -> SourceRead: ...


class Problems:
    """Collects bad rows by kind; ``finish`` raises one ``DataError`` naming them, or returns them as skipped."""

    def __init__(self, where: str, taxonomy: Taxonomy | None = None) -> None:
        self.where = where
        self.taxonomy = taxonomy  # named in the message when a diagnosis was the problem
        self.by_kind: dict[str, list[tuple[str, str]]] = {}

    def add(self, kind: str, item: str, detail: str = "") -> None:
        self.by_kind.setdefault(kind, []).append((item, detail))

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def skipped(self) -> list[Skipped]:
        return [Skipped(item, f"{kind}: {d}" if d else kind) for kind, rows in self.by_kind.items() for item, d in rows]

    def message(self, hint: str = "") -> str:
        parts = []
        for kind, rows in self.by_kind.items():
            shown = "; ".join(f"{i} ({d})" if d else i for i, d in rows[:SHOWN])
            more = f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
            parts.append(f"{len(rows)} {kind}: {shown}{more}")
        if self.taxonomy is not None and any("diagnos" in kind for kind in self.by_kind):
            parts.append(
                f"Known diagnosis codes: {', '.join(sorted(self.taxonomy.codes))} (extend with a taxonomy file)"
            )
        return f"{self.where}: " + ". ".join(parts) + (f". {hint}" if hint else "")

    def finish(self, skip: bool, hint: str = "pass skip_invalid to skip them (each is listed)") -> list[Skipped]:
        if self and not skip:
            raise DataError(self.message(hint))
        return self.skipped()


def read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV's column names and its rows with their line numbers (the header is line 1); values stripped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = [
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not columns:
        raise DataError(f"{path} is empty: expected a header row")
    return columns, rows


def csv_columns(path: Path) -> list[str]:
    """The header of a CSV, or [] when it cannot be read (for ``detect``, which must not raise)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def require_columns(path: Path, columns: list[str], wanted: Iterable[str], hint: str = "") -> None:
    """``DataError`` naming each wanted column the CSV lacks, the columns it has, and a close match if any."""
    missing = [c for c in wanted if c not in columns]
    if not missing:
        return
    close = {m: difflib.get_close_matches(m, columns, n=1) for m in missing}
    guesses = "".join(f" ('{m}': did you mean '{c[0]}'?)" for m, c in close.items() if c)
    raise DataError(
        f"{path} has no column {', '.join(repr(m) for m in missing)}{guesses}; its columns are: "
        f"{', '.join(columns)}" + (f". {hint}" if hint else "")
    )


def list_images(folder: Path) -> list[Path]:
    """The image files directly in a folder, sorted by name (hidden files ignored)."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def index_images(root: Path, folders: Iterable[str]) -> dict[str, Path]:
    """Image file stem -> path over the given subfolders of ``root`` that exist; the same stem twice is an error."""
    index: dict[str, Path] = {}
    for name in folders:
        folder = root / name
        if not folder.is_dir():
            continue
        for p in list_images(folder):
            if p.stem in index:
                raise DataError(f"image {p.stem} is in {root} twice: {index[p.stem]} and {p}; keep one")
            index[p.stem] = p
    return index


def unlisted_images(
    root: Path, index: Mapping[str, Path], listed: set[str], label_file: str, options: ReadOptions
) -> list[Skipped]:
    """Images of the image folders that the label file does not list: an error unless a flag allows skipping."""
    extra = sorted(index[k].relative_to(root).as_posix() for k in index.keys() - listed)
    problems = Problems(f"{root}")
    for rel in extra:
        problems.add(f"images not listed in {label_file}", rel)
    return problems.finish(
        options.skip_unlisted or options.skip_invalid, "pass skip_unlisted (or skip_invalid) to leave them out"
    )


def find_label_files(root: Path, pattern: str) -> list[Path]:
    """CSV files directly in ``root`` matching a glob, provenance files excluded, sorted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.name not in NOT_LABEL_FILES)


def meta_of(row: Mapping[str, str], names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """The non-empty metadata columns of a row as (name, value) pairs."""
    return tuple((n, row[n]) for n in names if row.get(n))
