"""Format adapters: each reads one folder layout, as users download it, into a list of ``Sample`` rows.

``FORMATS`` is the registry (name -> adapter). ``detect_format`` picks a folder's format from its files: the
specific formats first (folder, ham10000, isic2018, isic2019, isic2020), the generic ``csv`` only when none of
them matches; two specific matches are ambiguous and name the formats to choose from (``format:path``).
"""

from __future__ import annotations

from pathlib import Path

from lesionlab.data.formats.base import Format, ReadOptions, SourceRead
from lesionlab.data.formats.folder import FolderFormat
from lesionlab.data.formats.isic import ISIC2018, ISIC2019, Ham10000Format, Isic2020Format
from lesionlab.data.formats.table import CsvFormat
from lesionlab.errors import DataError

__all__ = ["FORMATS", "Format", "ReadOptions", "SourceRead", "detect_format", "formats_help", "read_source"]

FORMATS: dict[str, Format] = {
    f.name: f for f in (FolderFormat(), Ham10000Format(), ISIC2018, ISIC2019, Isic2020Format(), CsvFormat())
}
FALLBACK = "csv"  # generic: many specific label files would also pass as a CSV with an image column


def formats_help() -> str:
    """Every format and the files it expects, one per line (for errors and the CLI's help)."""
    return "\n".join(f"  {name}: {f.expects}" for name, f in FORMATS.items())


def detect_format(root: Path) -> Format:
    """The one adapter that recognises ``root``; ``DataError`` listing every format when none or several do."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    specific = [f for name, f in FORMATS.items() if name != FALLBACK and f.detect(root)]
    if len(specific) > 1:
        names = ", ".join(f.name for f in specific)
        raise DataError(f"{root} looks like several formats ({names}); name one as <format>:{root}")
    if specific:
        return specific[0]
    if FORMATS[FALLBACK].detect(root):
        return FORMATS[FALLBACK]
    raise DataError(
        f"no format recognises {root}; name one as <format>:{root} once its files are there. Formats:\n"
        + formats_help()
    )


def read_source(root: Path, format_name: str | None, options: ReadOptions) -> SourceRead:
    """Reads one folder with the named format, or the detected one."""
    if format_name is None:
        return detect_format(root).read(root, options)
    if format_name not in FORMATS:
        raise DataError(f"unknown data format {format_name!r}; formats:\n{formats_help()}")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    return FORMATS[format_name].read(root, options)
