"""The ISIC-family formats as users download them: HAM10000, ISIC 2018 Task 3, ISIC 2019 and ISIC 2020.

Their image ids (ISIC_0024306), lesion ids (HAM_0000118, IL_...) and patient ids (IP_...) are ISIC-Archive-wide:
the same id in two of these sets is the same image, lesion or patient, so ``SourceRead.global_ids`` is true and
``data.sources`` links them across sources. None of them fixes a split except a ground-truth file named "Test",
whose rows are fixed test images.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from lesionlab.data.formats.base import (
    Problems,
    ReadOptions,
    SourceRead,
    csv_columns,
    find_label_files,
    index_images,
    meta_of,
    read_table,
    require_columns,
    unlisted_images,
)
from lesionlab.data.sample import Sample
from lesionlab.data.taxonomy import parse_label
from lesionlab.errors import DataError


def isic_image_id(stem: str) -> str:
    """The archive id of an image file stem: ISIC 2019 ships some as ``ISIC_0000000_downsampled``."""
    return stem.removesuffix("_downsampled")


def first_rows(
    rows: Sequence[tuple[int, Mapping[str, str]]], key: str, problems: Problems, seen: set[str]
) -> Iterator[tuple[str, str, Mapping[str, str]]]:
    """(image, "line N (image)", row) of each row whose ``key`` was not seen before; a repeat is reported as a
    duplicate row and skipped. ``seen`` collects the images."""
    for line, row in rows:
        image = row[key]
        where = f"line {line} ({image})"
        if image in seen:
            problems.add("duplicate rows", where)
            continue
        seen.add(image)
        yield image, where, row


def _image_folders(options: ReadOptions, defaults: Sequence[str]) -> list[str]:
    given = options.options.get("images")
    return [f.strip() for f in given.split(",")] if given else list(defaults)


def _finish(
    fmt: str,
    root: Path,
    label_file: Path,
    samples: list[Sample],
    problems: Problems,
    index: Mapping[str, Path],
    listed: set[str],
    options: ReadOptions,
    skipped_extra: list | None = None,
) -> SourceRead:
    """Raises or skips the collected problems, then the unlisted images; an empty result is an error."""
    skipped = list(skipped_extra or [])
    skipped += problems.finish(options.skip_invalid)
    skipped += unlisted_images(root, index, listed, label_file.name, options)
    if not samples:
        raise DataError(f"{label_file} gives no usable images" + (f" ({len(skipped)} skipped)" if skipped else ""))
    ids = {s.relpath: isic_image_id(s.path.stem) for s in samples}
    return SourceRead(fmt, samples, skipped, global_ids=True, image_ids=ids)


class Ham10000Format:
    name = "ham10000"
    expects = (
        "HAM10000_metadata.csv (lesion_id,image_id,dx,...) and the images in images/, "
        "HAM10000_images_part_1/ or HAM10000_images_part_2/"
    )
    FOLDERS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images")
    META = ("age", "sex", "localization", "dx_type", "dataset")

    def detect(self, root: Path) -> bool:
        return (root / "HAM10000_metadata.csv").is_file()

    def read(self, root: Path, options: ReadOptions) -> SourceRead:
        """One sample per metadata row: diagnosis ``dx``, ``lesion_id``, meta age/sex/localization/dx_type."""
        label_file = root / options.options.get("file", "HAM10000_metadata.csv")
        columns, rows = read_table(label_file)
        require_columns(label_file, columns, ["lesion_id", "image_id", "dx"])
        index = index_images(root, _image_folders(options, self.FOLDERS))
        problems = Problems(str(label_file), options.taxonomy)
        samples, seen = [], set[str]()
        for image, where, row in first_rows(rows, "image_id", problems, seen):
            if image not in index:
                problems.add("images listed but missing", where)
                continue
            try:
                code = options.taxonomy.canonical(row["dx"])
            except DataError:
                problems.add("diagnoses outside the taxonomy", where, row["dx"])
                continue
            path = index[image]
            samples.append(
                Sample(
                    path.relative_to(root).as_posix(),
                    path,
                    options.taxonomy.label(code),
                    diagnosis=code,
                    lesion_id=row["lesion_id"] or None,
                    meta=meta_of(row, self.META),
                )
            )
        return _finish(self.name, root, label_file, samples, problems, index, seen, options)


class OneHotFormat:
    """ISIC 2018 Task 3 and ISIC 2019: a ground-truth CSV ``image,<class columns>`` with 1.0 in one column."""

    def __init__(self, name: str, classes: tuple[str, ...], unknown: str | None, expects: str) -> None:
        self.name, self.class_columns, self.unknown, self.expects = name, classes, unknown, expects

    def _ground_truths(self, root: Path) -> list[Path]:
        wanted = set(self.class_columns)
        found = []
        for p in find_label_files(root, "*.csv"):
            cols = csv_columns(p)
            # the other year's file has the other column set (AKIEC vs AK, SCC): exact sets keep them apart
            extra = {self.unknown, "score_weight"}  # ISIC 2019's test ground truth adds a weight column
            if cols[:1] == ["image"] and set(cols[1:]) - extra == wanted and "Metadata" not in p.name:
                found.append(p)
        return found

    def detect(self, root: Path) -> bool:
        return bool(self._ground_truths(root))

    def _label_file(self, root: Path, options: ReadOptions) -> Path:
        if "file" in options.options:
            return root / options.options["file"]
        found = self._ground_truths(root)
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise DataError(f"{root}: expected one {self.name} ground-truth CSV, found {names}; name it with file=")
        return found[0]

    def _metadata(self, root: Path, options: ReadOptions) -> dict[str, dict[str, str]]:
        """The optional metadata CSV (ISIC 2019: image,age_approx,anatom_site_general,lesion_id,sex) by image."""
        name = options.options.get("metadata")
        paths = [root / name] if name else find_label_files(root, "*Metadata*.csv")
        if not paths:
            return {}
        if len(paths) > 1:
            raise DataError(f"{root}: several metadata CSVs ({', '.join(p.name for p in paths)}); name one: metadata=")
        columns, rows = read_table(paths[0])
        require_columns(paths[0], columns, ["image"])
        return {row["image"]: row for _, row in rows}

    def read(self, root: Path, options: ReadOptions) -> SourceRead:
        """A row of no class, or of the UNK class, is an error unless ``allow_unknown`` (then skipped, listed)."""
        label_file = self._label_file(root, options)
        columns, rows = read_table(label_file)
        require_columns(label_file, columns, ["image", *self.class_columns])
        codes = {c: options.taxonomy.canonical(c) for c in self.class_columns}
        stem = label_file.stem.replace("_v2", "")
        folders = ["images", stem.replace("GroundTruth", "Input"), stem.replace("_GroundTruth", "")]
        folders += [f"{f}/{f}" for f in folders[1:]]  # Kaggle's uploads nest the folder in itself
        index = index_images(root, _image_folders(options, folders))
        metadata = self._metadata(root, options)
        split = "test" if "test" in label_file.name.lower() else None
        problems, unknown = Problems(str(label_file), options.taxonomy), Problems(str(label_file))
        samples, seen = [], set[str]()
        for image, where, row in first_rows(rows, "image", problems, seen):
            try:
                hot = [c for c in [*self.class_columns, self.unknown] if c and float(row.get(c) or 0) >= 0.5]
            except ValueError:
                problems.add("rows with values that are not numbers", where)
                continue
            if not hot or hot == [self.unknown]:
                (unknown if options.allow_unknown else problems).add("rows of no class or UNK", where)
                continue
            if len(hot) > 1:
                problems.add("rows with several classes set", where, "+".join(hot))
                continue
            if image not in index:
                problems.add("images listed but missing", where)
                continue
            path, meta = index[image], metadata.get(image, {})
            samples.append(
                Sample(
                    path.relative_to(root).as_posix(),
                    path,
                    options.taxonomy.label(codes[hot[0]]),
                    diagnosis=codes[hot[0]],
                    lesion_id=meta.get("lesion_id") or None,
                    split=split,
                    meta=meta_of(meta, [k for k in meta if k not in ("image", "lesion_id")]),
                )
            )
        return _finish(self.name, root, label_file, samples, problems, index, seen, options, unknown.skipped())


ISIC2018 = OneHotFormat(
    "isic2018",
    ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
    None,
    "an ISIC 2018 Task 3 ground-truth CSV (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC, one-hot) and images/ "
    "(or ISIC2018_Task3_<part>_Input/)",
)
ISIC2019 = OneHotFormat(
    "isic2019",
    ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"),
    "UNK",
    "an ISIC 2019 ground-truth CSV (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK, one-hot), optional "
    "ISIC_2019_*_Metadata.csv (lesion_id) and images/ (or ISIC_2019_<part>_Input/)",
)


class Isic2020Format:
    name = "isic2020"
    expects = (
        "train.csv (or ISIC_2020_Training_GroundTruth.csv: image_name,patient_id,lesion_id,sex,age_approx,"
        "anatom_site_general_challenge,diagnosis,benign_malignant,target) and images in jpeg/train/ or train/"
    )
    FILES = ("train.csv", "ISIC_2020_Training_GroundTruth.csv", "ISIC_2020_Training_GroundTruth_v2.csv")
    META = ("sex", "age_approx", "anatom_site_general_challenge")

    def _label_files(self, root: Path) -> list[Path]:
        return [root / f for f in self.FILES if {"image_name", "target"} <= set(csv_columns(root / f))]

    def detect(self, root: Path) -> bool:
        return bool(self._label_files(root))

    def read(self, root: Path, options: ReadOptions) -> SourceRead:
        """The label is ``target`` (it must agree with ``benign_malignant`` and with a known ``diagnosis``);
        diagnosis "unknown" (most benign images) leaves ``diagnosis`` unset rather than guessing it."""
        found = [root / options.options["file"]] if "file" in options.options else self._label_files(root)
        if not found:
            raise DataError(f"{root}: no ISIC 2020 label file; expected {self.expects}")
        label_file = found[0]
        columns, rows = read_table(label_file)
        require_columns(label_file, columns, ["image_name", "target"])
        given = options.options.get("images")
        folders = [given] if given else [f for f in ("jpeg/train", "train", "images") if (root / f).is_dir()][:1]
        index = index_images(root, folders)
        problems = Problems(str(label_file), options.taxonomy)
        samples, seen = [], set[str]()
        for image, where, row in first_rows(rows, "image_name", problems, seen):
            try:
                label = parse_label(row["target"])
                if row.get("benign_malignant") and parse_label(row["benign_malignant"]) != label:
                    raise DataError("target and benign_malignant disagree")
            except DataError as e:
                problems.add("rows with a bad label", where, str(e))
                continue
            diagnosis = row.get("diagnosis", "")
            code = None
            if diagnosis and diagnosis.lower() not in ("unknown", "unk"):
                if not options.taxonomy.knows(diagnosis):
                    problems.add("diagnoses outside the taxonomy", where, diagnosis)
                    continue
                code = options.taxonomy.canonical(diagnosis)
                if options.taxonomy.label(code) != label:
                    problems.add("rows whose label disagrees with the diagnosis", where, f"{diagnosis}, {label}")
                    continue
            if image not in index:
                problems.add("images listed but missing", where)
                continue
            path = index[image]
            samples.append(
                Sample(
                    path.relative_to(root).as_posix(),
                    path,
                    label,
                    diagnosis=code,
                    lesion_id=row.get("lesion_id") or None,
                    patient_id=row.get("patient_id") or None,
                    meta=meta_of(row, self.META),
                )
            )
        return _finish(self.name, root, label_file, samples, problems, index, seen, options)
