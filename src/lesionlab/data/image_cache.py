"""Decoded images on disk: one memory-mapped uint8 array per preprocessing, so that a file is decoded once.

Fine-tuning reads every image every epoch. Decoding JPEGs each time costs more than the network on small
backbones, and holding them all in memory does not scale (58,000 ISIC images at 384 px are 26 GB). So the
decoded, resized (and colour-corrected) images live in a file that is mapped, not read: the pages are the
kernel's page cache, shared by every process that maps the file (DataLoader workers, DDP ranks, the next run),
and not the processes' own memory, which stays bounded whatever the number of images.

``$LESIONLAB_CACHE_DIR/images/<key>/``, where ``key`` hashes the cache version and the :class:`ImageSpec`
(input size, resize mode, colour constancy):

- ``pixels.u8``: slot-major uint8 S x S x 3 images; a sparse file grown by whole chunks of slots
- ``filled.u8``: one byte per slot, set to 1 after its pixels are written (so a killed fill resumes)
- ``index.json``: ``{absolute path: [bytes, mtime_ns, slot]}``: a file's identity is its path, size and
  modification time, so a changed (or replaced) file invalidates its entry and is decoded again into its slot
- ``lock``: held (``flock``) while slots are assigned, so concurrent runs and ranks never hand out one slot twice

Writers of one slot write the same bytes (a file decodes to one image), so two processes filling at once are
harmless. Nothing here knows about training: :meth:`ImageCache.slots` assigns, :meth:`ImageCache.fill` decodes
what is missing (in DataLoader worker processes), :meth:`ImageCache.image` and :meth:`ImageCache.read` read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.data.images import BadImageError, color_constancy, open_image, resize_to_input
from lesionlab.data.sample import Sample
from lesionlab.files import atomic_write_json, cache_root
from lesionlab.runtime import frozen_heap

VERSION = 1
GROW = 1024  # slots added at a time: the files are extended (sparsely) in chunks, not per image


@dataclass(frozen=True)
class ImageSpec:
    """What a cached image is: ``size`` x ``size`` by ``resize`` (``images.RESIZE_MODES``'s words or names), then
    ``color_constancy`` (``images.COLOR_CONSTANCY``)."""

    size: int
    resize: str = "crop"
    color_constancy: str = "none"

    def key(self) -> str:
        from lesionlab.data.images import RESIZE_MODES

        text = f"v{VERSION}|{self.size}|{RESIZE_MODES.get(self.resize, self.resize)}|{self.color_constancy}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def make(self, sample: Sample) -> np.ndarray:
        """The uint8 S x S x 3 image of one file; BadImageError when it cannot be read."""
        image = resize_to_input(open_image(sample.path, sample.relpath), self.size, self.resize)
        return color_constancy(image, self.color_constancy)


class ImageCache:
    """The cached images of one :class:`ImageSpec` under ``root`` (default: ``cache_root() / "images"``).

    Picklable: the memory maps are opened lazily in each process and not pickled, so a DataLoader worker or a
    Ray task maps the same file."""

    def __init__(self, spec: ImageSpec, root: str | Path | None = None):
        self.spec = spec
        self.dir = Path(root or cache_root() / "images") / spec.key()
        self._pixels: np.memmap | None = None
        self._filled: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "dir": self.dir, "_pixels": None, "_filled": None}

    @property
    def image_bytes(self) -> int:
        return self.spec.size * self.spec.size * 3

    # ------------------------------------------------------------------ slots

    def slots(self, samples: Sequence[Sample]) -> np.ndarray:
        """Each sample's slot (int64), assigning new ones to files not seen before; a file whose size or
        modification time changed keeps its slot, emptied, so it is decoded again. A file that does not exist
        gets a slot too: :meth:`fill` reports it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            index = self._read_index()
            stale: list[int] = []
            out = np.empty(len(samples), np.int64)
            for i, s in enumerate(samples):
                path = str(Path(s.path).resolve())
                identity = _identity(path)
                entry = index.get(path)
                if entry is None:
                    entry = index[path] = [*identity, len(index)]
                elif tuple(entry[:2]) != identity:
                    entry[:2] = identity
                    stale.append(entry[2])
                out[i] = entry[2]
            capacity = -(-len(index) // GROW) * GROW
            self._grow(capacity)
            if stale:
                filled = self._map_filled(max(stale) + 1)
                filled[stale] = 0
                filled.flush()
            atomic_write_json(self.dir / "index.json", index)
        return out

    def _read_index(self) -> dict[str, list[int]]:
        path = self.dir / "index.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _grow(self, capacity: int) -> None:
        """Extends both files (sparsely: unwritten slots take no disk) to hold ``capacity`` slots."""
        for name, per_slot in (("pixels.u8", self.image_bytes), ("filled.u8", 1)):
            path = self.dir / name
            size = capacity * per_slot
            if not path.exists() or path.stat().st_size < size:
                with open(path, "ab") as f:
                    f.truncate(size)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ memory maps

    def _capacity(self) -> int:
        return (self.dir / "filled.u8").stat().st_size

    def _map_pixels(self, needed: int = 0) -> np.memmap:
        if self._pixels is None or len(self._pixels) < needed:  # another process may have grown the file
            n, s = self._capacity(), self.spec.size
            self._pixels = np.memmap(self.dir / "pixels.u8", np.uint8, "r+", shape=(n, s, s, 3))
        return self._pixels

    def _map_filled(self, needed: int = 0) -> np.memmap:
        if self._filled is None or len(self._filled) < needed:
            self._filled = np.memmap(self.dir / "filled.u8", np.uint8, "r+", shape=(self._capacity(),))
        return self._filled

    def missing(self, slots: np.ndarray) -> np.ndarray:
        """The positions in ``slots`` whose images are not decoded yet."""
        if len(slots) == 0:
            return np.zeros(0, np.int64)
        filled = self._map_filled(int(slots.max()) + 1)
        return np.flatnonzero(filled[slots] == 0)

    def put(self, slot: int, image: np.ndarray) -> None:
        """Writes one image into its slot, then marks it filled."""
        self._map_pixels(slot + 1)[slot] = image
        self._map_filled(slot + 1)[slot] = 1

    def image(self, slot: int) -> np.ndarray:
        """A view of one cached image (uint8 S x S x 3; valid while the cache lives)."""
        return self._map_pixels(slot + 1)[slot]

    def read(self, slots: np.ndarray) -> np.ndarray:
        """A copy of the cached images at ``slots`` (uint8 N x S x S x 3)."""
        if len(slots) == 0:
            return np.zeros((0, self.spec.size, self.spec.size, 3), np.uint8)
        return np.asarray(self._map_pixels(int(slots.max()) + 1)[slots])

    # ------------------------------------------------------------------ filling

    def fill(
        self, samples: Sequence[Sample], slots: np.ndarray, workers: int = 0, progress: bool = True
    ) -> list[BadImageError]:
        """Decodes every sample whose slot is empty, in ``workers`` DataLoader worker processes (0: this one),
        with a progress bar; returns the files that could not be read (their slots stay empty). A killed fill
        loses nothing it finished."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        todo = self.missing(slots)
        if len(todo) == 0:
            return []
        jobs = _FillJobs(self, [samples[i] for i in todo], slots[todo])
        loader: DataLoader = DataLoader(
            jobs,  # type: ignore[arg-type]  # a map-style dataset by protocol (__len__, __getitem__)
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_as_is,
        )
        bad: list[BadImageError] = []
        desc = f"decode {self.spec.size}px"
        with frozen_heap(workers > 0):
            results = iter(loader)  # forks the workers
        for err in tqdm(results, total=len(jobs), desc=desc, disable=not progress, unit="img"):
            if err is not None:  # (path, reason, status): the exception itself does not pickle
                bad.append(BadImageError(*err))
        self._map_pixels().flush()
        self._map_filled().flush()
        return bad

    def decoded(self) -> int:
        """How many slots hold an image (for reports and tests)."""
        return int(self._map_filled().sum()) if (self.dir / "filled.u8").exists() else 0


def _identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _as_is(x: Any) -> Any:
    return x


class _FillJobs:
    """A map-style dataset whose items decode one file each into the cache: None, or why it could not be read
    (a BadImageError's path, reason and status)."""

    def __init__(self, cache: ImageCache, samples: list[Sample], slots: np.ndarray):
        self.cache, self.samples, self.slots = cache, samples, slots

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, str, int] | None:
        try:
            self.cache.put(int(self.slots[i]), self.cache.spec.make(self.samples[i]))
        except BadImageError as e:
            return (e.path, e.reason, e.status)
        return None
