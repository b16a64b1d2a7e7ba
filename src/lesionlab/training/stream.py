"""Fine-tuning's data pipeline: cached images (``data.image_cache``) streamed through a torch DataLoader.

- **Order.** :class:`EpochBatches` draws the epoch's permutation from ``optim.epoch_generator(seed, epoch)``
  (the order earlier versions trained in) and cuts it into global batches of ``batch_size``; a process of a
  distributed run takes its share of each (``batch[rank::world]``), so the ranks together train exactly the
  batches one process would.
- **Augmentation.** Each image is augmented in a worker process with torch's generator seeded by
  :func:`image_seed` (seed, epoch, image index), inside ``fork_rng`` so that no other draw moves: an image's
  augmentation is the same whatever the number of workers, processes or machines, and a resumed run repeats
  an unbroken one.
- **Workers.** ``--data-workers`` processes read the memory-mapped cache (no decoding after the first pass)
  and augment, while the main process trains; batches stay uint8 until the device (4x less to copy), where
  they are scaled and normalised (``augment.to_input``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lesionlab.data.image_cache import ImageCache
from lesionlab.training.augment import augment_batch
from lesionlab.training.optim import epoch_generator

#: One training item as the sampler hands it to a worker: (epoch, index into the training set).
Key = tuple[int, int]


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of training image ``index`` in ``epoch`` of a run seeded ``seed``: a hash, so
    neighbouring images and epochs get unrelated draws."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are below 2**63


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of ``n`` training images. It also seeds torch's global generator from the epoch's
    generator first (as the loop always did), so that draws of the training step (dropout) depend only on
    (seed, epoch) too."""
    g = epoch_generator(seed, epoch)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return torch.randperm(n, generator=g)


class EpochBatches(Sampler[list[Key]]):
    """This rank's share of each global batch of the epoch set by :meth:`set_epoch` (DistributedSampler's
    contract); ``len`` is the number of global batches, the same on every rank (a rank's share of the last,
    short batch may be empty)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        perm = epoch_order(self.n, self.seed, self.epoch).tolist()
        for i in range(0, self.n, self.batch_size):
            yield [(self.epoch, j) for j in perm[i : i + self.batch_size][self.rank :: self.world]]


class AugmentedImages:
    """The training images of a cache (``slots``) as a map-style dataset of :data:`Key` batches:
    ``__getitems__`` returns (uint8 N x 3 x S x S augmented images, int64 N indices)."""

    def __init__(self, cache: ImageCache, slots: np.ndarray, size: int, augment: str, seed: int):
        self.cache, self.slots, self.size, self.augment, self.seed = cache, slots, size, augment, seed

    def __len__(self) -> int:
        return len(self.slots)

    def augmented(self, epoch: int, index: int) -> torch.Tensor:
        img = torch.from_numpy(np.array(self.cache.image(int(self.slots[index])))).permute(2, 0, 1)
        if self.augment == "none":
            return img
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(self.seed, epoch, index))
            return augment_batch(img[None], self.size, self.augment)[0]

    def __getitems__(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor]:
        if not keys:
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
        images = torch.stack([self.augmented(epoch, index) for epoch, index in keys])
        return images, torch.tensor([index for _, index in keys], dtype=torch.int64)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        images, index = self.__getitems__([key])
        return images[0], index[0]


def _as_is(batch: Any) -> Any:  # __getitems__ already returns the batch
    return batch


def training_loader(
    images: AugmentedImages, sampler: EpochBatches, workers: int, pin_memory: bool = False
) -> DataLoader:
    """The DataLoader of a run: ``workers`` persistent processes (0: the main process), two batches ahead each."""
    return DataLoader(
        images,  # type: ignore[arg-type]  # a map-style dataset by protocol (__getitems__), not by base class
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
