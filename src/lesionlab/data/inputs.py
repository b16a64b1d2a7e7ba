"""What a user points ``predict`` at, expanded to image files: files, folders (recursively), globs, datasets."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from lesionlab.errors import DataError

#: Suffixes taken from a plain folder or a glob (what open_image decodes); a file named outright is always tried.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".mpo"})


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _dataset_images(folder: Path) -> list[Path] | None:
    """The images a data format lists for ``folder`` (a HAM10000 or ISIC folder, a labelled CSV...), or None when
    no format recognises it; a plain folder of images is then read recursively."""
    from lesionlab.data.formats import detect_format
    from lesionlab.data.sources import load_external

    try:
        detect_format(folder)
    except DataError:
        return None
    return [s.path for s in load_external(folder).test]


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Image paths, in the order given: a file as is; a folder as the images its data format lists, else every
    image file under it (recursively, sorted); a pattern with * ? or [ ] as its sorted glob (``**`` recurses); any
    other path as is, so that decoding reports it ("file not found"). DataError naming a folder or a pattern that
    holds no image. A path given twice is kept once."""
    out: list[Path] = []
    empty: list[str] = []
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found = _dataset_images(path) or _images_under(path)
        elif not path.exists() and any(c in text for c in "*?["):
            matches = map(Path, glob.glob(text, recursive=True))
            found = sorted(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = [path]
        if not found:
            empty.append(text)
        out += found
    if empty:
        raise DataError(
            "no image found in: " + ", ".join(empty) + " (give image files, folders of images, a dataset folder "
            "or a glob such as 'site/**/*.jpg')"
        )
    unique: list[Path] = []
    seen: set[Path] = set()
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
