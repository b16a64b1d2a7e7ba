"""Errors a user can fix. The CLI prints them as one line; anything else is a bug and shows its traceback."""

from __future__ import annotations


class LesionlabError(ValueError):
    """Base class: bad input, a missing file or folder, an option out of range. The message says what to do.

    A ValueError, so that library callers who caught ValueError before keep working."""


class DataError(LesionlabError):
    """The data folder is not laid out as expected, or a split cannot be made."""
