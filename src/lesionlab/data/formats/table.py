"""The generic CSV format: one row per image, a label and/or a diagnosis, optional lesion, patient and split.

Columns (each renamable with a spec option, e.g. ``csv:path?image=file&label=y``): ``image`` (a path relative to
the CSV's folder, or to ``images=``; an extension may be left off), ``label`` (benign/malignant/0/1, or the class
names), ``diagnosis`` (a taxonomy name: gives the label when there is no label column, and must agree with it when
there is), ``lesion_id``, ``patient_id`` and ``split`` (train/test; val or validation count as training pool, whose
validation part lesionlab carves itself). PH2's ``PH2_labels.csv`` is such a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lesionlab.data.formats.base import (
    IMAGE_SUFFIXES,
    Problems,
    ReadOptions,
    SourceRead,
    csv_columns,
    find_label_files,
    list_images,
    read_table,
    require_columns,
    unlisted_images,
)
from lesionlab.data.sample import Sample
from lesionlab.data.taxonomy import parse_label
from lesionlab.errors import DataError

# role -> the column names tried when the spec does not name one
DEFAULT_COLUMNS = {
    "image": ("image", "image_path", "path", "file", "filename"),
    "label": ("label", "benign_malignant", "target"),
    "diagnosis": ("diagnosis", "dx"),
    "lesion": ("lesion_id", "lesion", "group"),
    "patient": ("patient_id", "patient"),
    "split": ("split",),
}
SPLIT_VALUES = {"train": "train", "test": "test", "val": "train", "valid": "train", "validation": "train", "": None}


def _pick(columns: list[str], role: str) -> str | None:
    return next((c for c in DEFAULT_COLUMNS[role] if c in columns), None)


class CsvFormat:
    name = "csv"
    expects = (
        "a CSV with an image column (paths relative to it) and a label (benign/malignant/0/1) or diagnosis column; "
        "optional lesion_id, patient_id, split columns (names set with image=, label=, ... options)"
    )

    def _candidates(self, root: Path, named: Mapping[str, str] | None = None) -> list[Path]:
        """The CSVs of ``root`` with an image column and a label or diagnosis column (``named`` ones, if given)."""
        named = named or {}
        has = lambda cols, role: named[role] in cols if role in named else _pick(cols, role)
        return [
            p
            for p in find_label_files(root, "*.csv")
            if has(cols := csv_columns(p), "image") and (has(cols, "label") or has(cols, "diagnosis"))
        ]

    def detect(self, root: Path) -> bool:
        return bool(self._candidates(root))

    def _label_file(self, root: Path, options: ReadOptions) -> Path:
        if "file" in options.options:
            return root / options.options["file"]
        # the only CSV there is the label file even when its columns are wrong: then its columns are the error
        found = self._candidates(root, options.options) or find_label_files(root, "*.csv")
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise DataError(f"{root}: expected one label CSV, found {names}; name it with file=")
        return found[0]

    def _columns(self, path: Path, columns: list[str], options: ReadOptions) -> dict[str, str | None]:
        """role -> column: the spec's names (which must exist: a misspelt one is an error) or the defaults."""
        named = {role: options.options[role] for role in DEFAULT_COLUMNS if role in options.options}
        require_columns(path, columns, named.values())
        picked = {role: named.get(role) or _pick(columns, role) for role in DEFAULT_COLUMNS}
        if picked["image"] is None:
            require_columns(path, columns, ["image"], "name the image column with image=")
        if picked["label"] is None and picked["diagnosis"] is None:
            require_columns(path, columns, ["label"], "give a label or a diagnosis column (label=, diagnosis=)")
        return picked

    def _resolve(self, base: Path, value: str) -> Path:
        path = Path(os.path.normpath(base / value))
        if path.suffix or path.exists():
            return path
        return next((c for c in (path.with_suffix(x) for x in IMAGE_SUFFIXES) if c.exists()), path)

    def read(self, root: Path, options: ReadOptions) -> SourceRead:
        label_file = self._label_file(root, options)
        columns, rows = read_table(label_file)
        col = self._columns(label_file, columns, options)
        base = root / options.options.get("images", "")
        if not Path(os.path.normpath(base)).is_relative_to(os.path.normpath(root)):
            raise DataError(
                f"images={options.options['images']} in the data spec points outside the source folder {root}; "
                "give the folder that holds both the CSV and the images (images= a folder inside it)"
            )
        classes = {c.lower(): k for k, c in enumerate(options.classes)}
        problems = Problems(str(label_file), options.taxonomy)
        samples: list[Sample] = []
        seen: set[Path] = set()
        for line, row in rows:
            value = row[col["image"] or ""]
            where = f"line {line} ({value})"
            path = self._resolve(base, value)
            if not value or path in seen:
                problems.add("duplicate rows" if value else "rows with no image", where)
                continue
            seen.add(path)
            # a relpath must stay inside the source (a row's own "..", or an images= folder outside it)
            if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(root)):
                problems.add("images outside the CSV's folder", where)
                continue
            try:
                label, code = self._label(row, col, options, classes)
                split = SPLIT_VALUES[row[col["split"]].lower()] if col["split"] else None
            except KeyError:
                problems.add("rows with a split other than train/test", where, row[col["split"] or ""])
                continue
            except DataError as e:
                problems.add("rows with a bad label or diagnosis", where, str(e).split(":")[0])
                continue
            if not path.is_file():
                problems.add("images listed but missing", where)
                continue
            samples.append(
                Sample(
                    path.relative_to(root).as_posix(),
                    path,
                    label,
                    diagnosis=code,
                    lesion_id=row[col["lesion"]] or None if col["lesion"] else None,
                    patient_id=row[col["patient"]] or None if col["patient"] else None,
                    split=split,
                )
            )
        skipped = problems.finish(options.skip_invalid)
        # images in the folders the CSV points into that it does not list
        folders = {p.parent for p in seen if p.parent.is_dir()}
        index = {p.relative_to(root).as_posix(): p for f in folders for p in list_images(f)}
        listed = {p.relative_to(root).as_posix() for p in seen if p.is_relative_to(root)}  # not the outside ones
        skipped += unlisted_images(root, index, listed, label_file.name, options)
        if not samples:
            raise DataError(f"{label_file} gives no usable images" + (f" ({len(skipped)} skipped)" if skipped else ""))
        if col["split"]:
            check_splits(label_file, samples, options.classes)
        return SourceRead(self.name, samples, skipped, global_ids=options.options.get("ids") == "global")

    def _label(
        self, row: dict[str, str], col: dict[str, str | None], options: ReadOptions, classes: dict[str, int]
    ) -> tuple[int, str | None]:
        """The row's label and diagnosis code; ``DataError`` when either is bad or they disagree."""
        code = options.taxonomy.canonical(row[col["diagnosis"]]) if col["diagnosis"] else None
        if col["label"]:
            raw = row[col["label"]]
            label = classes[raw.lower()] if raw.lower() in classes else parse_label(raw)
            if code is not None and options.taxonomy.label(code) != label:
                raise DataError(f"label {raw} disagrees with diagnosis {row[col['diagnosis'] or '']}: ")
            return label, code
        assert code is not None  # _columns requires a label or a diagnosis column
        return options.taxonomy.label(code), code


def check_splits(label_file: Path, samples: list[Sample], classes: tuple[str, str]) -> None:
    """A split column must give each fixed split (train, test) images of both classes: an empty one is an error."""
    for split in ("train", "test"):
        part = [s for s in samples if s.split == split]
        for k, cls in enumerate(classes):
            if not any(s.label == k for s in part):
                raise DataError(
                    f"{label_file}: the split column gives split '{split}' no {cls} images "
                    f"({len(part)} images in it); an empty split cannot be trained or scored"
                )
