"""Process-wide CPU settings that make PyTorch fast on small machines without changing any number."""

from __future__ import annotations

import ctypes
import gc
import platform
from collections.abc import Iterator
from contextlib import contextmanager


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Lets glibc reuse freed blocks up to ``limit`` bytes instead of unmapping them at once.

    A CNN forward pass allocates and frees tensors of tens of MB per layer; by default glibc maps
    and unmaps each one, and the page faults cost more than the convolutions on a small CPU (3x
    the wall time of feature extraction measured here). Numbers are unchanged. No-op off glibc.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, limit)) and bool(libc.mallopt(-1, limit))  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> bool:
    """Returns the heap's free memory to the system (glibc's ``malloc_trim``). With :func:`keep_freed_memory`,
    blocks freed by one phase (a training epoch's activations) stay mapped and the next (validation, whose tensors
    have other sizes) adds its own: called between them, the process's memory is the larger phase's, not the sum.
    Costs milliseconds. No-op off glibc."""
    if platform.system() != "Linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


@contextmanager
def frozen_heap(enabled: bool = True) -> Iterator[None]:
    """While DataLoader workers fork (``iter(loader)``): this process's Python objects are moved out of the garbage
    collector's reach (``gc.freeze``), so that the collector in a forked worker does not write to every object it
    scans and copy each page of the parent's heap it touches (a probe of 360,000 objects: the worker's private memory
    85 -> 13 MB). The parent collects them again afterwards; nothing is freed that would not be."""
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
