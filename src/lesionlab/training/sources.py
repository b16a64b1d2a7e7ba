"""What the training loop trains on: a data source per transfer mode, both behind one small contract.

- :class:`FeatureSource` (``frozen``): cached backbone feature vectors (``features.py``); the trainable module is
  the head alone, so an epoch takes seconds.
- :class:`ImageSource` (``finetune``): decoded uint8 images in the on-disk image cache (``data.image_cache``),
  streamed and augmented by a DataLoader (``stream.py``); the trainable module is the whole network. BatchNorm
  layers of the backbone stay in eval mode (their running statistics are frozen; their scale and shift still
  learn), because batches of 32 dermoscopy images are too small and too unlike ImageNet to re-estimate them, and
  because some weights (the Coral MobileNetV2) have BatchNorm folded into the convolutions.

Sources are plain arrays plus settings (an image source: the cache's slots), so they pickle (sweep trials run in
worker processes and Ray tasks). Each gives the loop a :class:`Feed`, the batches of one epoch after another; in a
distributed run (``distributed.Ranks``) a feed yields this rank's share of each global batch, and scoring splits
the validation images between the ranks.
Besides the 0/1 labels, a ``--target diagnosis`` source holds each image's diagnosis class (``targets.py``; -1
where only benign/malignant is known) and the head's classes; a binary source holds neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn

from lesionlab.data.image_cache import ImageCache
from lesionlab.data.images import normalize
from lesionlab.models.backbones import ResolvedWeights
from lesionlab.models.batching import map_batches
from lesionlab.models.classifier import Diagnoses, Head, LesionClassifier, build_model, set_grad_checkpointing
from lesionlab.runtime import frozen_heap
from lesionlab.training.augment import to_input
from lesionlab.training.config import TrainConfig
from lesionlab.training.device import AUTOCAST, module_device, to_device
from lesionlab.training.distributed import Ranks
from lesionlab.training.optim import Loss, binary_auc, epoch_generator
from lesionlab.training.stream import AugmentedImages, EpochBatches, training_loader

Scores = tuple[float, float, float]  # loss, accuracy, AUC
#: Pixels in one validation batch: 64 images of 224 px, or as many pixels at other input sizes (at 384 px a batch
#: of 64 takes 3 GB of activations on the CPU), so that validation's memory does not grow with the input size.
VALIDATION_PIXELS = 64 * 224 * 224
#: A batch's float32 binary logits (N,), and its diagnosis logits (N, K) from a diagnosis head, else None.
Outputs = tuple[torch.Tensor, torch.Tensor | None]
#: A training batch (on the CPU): inputs, float 0/1 targets, int64 diagnosis classes (-1 where unknown; None for a
#: binary head), and the size of the global batch this is a share of (itself, in one process).
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]


class Feed(Protocol):
    """The training batches of a source, one epoch at a time (made once per training, so workers persist)."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, in the order drawn from (seed, epoch): the same on every call."""
        ...


class Source(Protocol):
    """A training set and a validation set, and how the trainable module is built, fed and scored."""

    y_train: np.ndarray
    #: True: an epoch's train loss/accuracy are re-measured on the whole training set after the epoch (cheap on
    #: vectors); False: they are the running mean over the epoch's (augmented) batches.
    rescore_train: bool

    @property
    def n_train(self) -> int: ...

    def describe(self, cfg: TrainConfig) -> str: ...

    def build(self, cfg: TrainConfig) -> nn.Module:
        """The freshly initialised trainable module (seeded from ``cfg.seed``)."""
        ...

    def prepare(self, module: nn.Module) -> None:
        """Once, after the optimizer, resume state and EMA exist: e.g. the memory layout."""
        ...

    def train_mode(self, module: nn.Module) -> None: ...

    def feed(self, cfg: TrainConfig, ranks: Ranks, pin_memory: bool = False) -> Feed:
        """The training batches of every epoch, this rank's share of each (``pin_memory``: for a GPU)."""
        ...

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> Outputs:
        """float32 binary logits of a training batch, and its diagnosis logits (None for a binary head)."""
        ...

    def score(self, module: nn.Module, split: str, loss_fn: Loss, ranks: Ranks = Ranks()) -> Scores:
        """Loss, accuracy and AUC of ``module`` on ``split`` (train or val), in eval mode; the same on every rank
        (each scores its share and the outputs are gathered)."""
        ...


@dataclass
class FeatureSource:
    """Frozen mode: feature vectors (float32 N x D) and 0/1 labels of the training and validation images; for a
    diagnosis head also their classes (``c_train``, ``c_val``) and the head's ``diagnoses``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    rescore_train: bool = True
    c_train: np.ndarray | None = None
    c_val: np.ndarray | None = None
    diagnoses: Diagnoses | None = None

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def describe(self, cfg: TrainConfig) -> str:
        return "train head"

    def build(self, cfg: TrainConfig) -> nn.Module:
        torch.manual_seed(cfg.seed + 1)  # as build_model seeds its head: the same head in both modes
        return Head(self.x_train.shape[1], dropout=cfg.dropout, diagnoses=self.diagnoses)

    def prepare(self, module: nn.Module) -> None:
        pass

    def train_mode(self, module: nn.Module) -> None:
        module.train()

    def feed(self, cfg: TrainConfig, ranks: Ranks, pin_memory: bool = False) -> Feed:
        if ranks.distributed:
            raise ValueError(
                "frozen mode trains its head in one process (it takes seconds): launch it without torchrun"
            )
        return _VectorFeed(self, cfg)

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> Outputs:
        return outputs_of(module, x)  # fp32 whatever cfg.precision says: vectors gain nothing from bf16

    @torch.inference_mode()
    def score(self, module: nn.Module, split: str, loss_fn: Loss, ranks: Ranks = Ranks()) -> Scores:
        x, y, c = (
            (self.x_train, self.y_train, self.c_train) if split == "train" else (self.x_val, self.y_val, self.c_val)
        )
        device = module_device(module)
        xt, yt = to_device(torch.from_numpy(x), device), to_device(torch.from_numpy(y), device)
        module.eval()
        logits, z = outputs_of(module, xt)
        loss = float(loss_fn(logits, yt, z, None if c is None else to_device(torch.from_numpy(c), device)))
        acc = float(((logits > 0).float() == yt).float().mean())  # binary accuracy, whatever the head
        return loss, acc, binary_auc(y, logits.cpu().numpy())


@dataclass
class _VectorFeed:
    """A frozen source's batches: rows of the feature arrays in the epoch's permutation."""

    source: FeatureSource
    cfg: TrainConfig

    def epoch(self, epoch: int) -> Iterator[Batch]:
        src, size = self.source, self.cfg.batch_size
        perm = torch.randperm(src.n_train, generator=epoch_generator(self.cfg.seed, epoch))
        for i in range(0, src.n_train, size):
            idx = perm[i : i + size]
            yield (
                torch.from_numpy(src.x_train)[idx],
                torch.from_numpy(src.y_train)[idx],
                _rows(src.c_train, idx),
                len(idx),
            )


@dataclass
class ImageSource:
    """Finetune mode: the training and validation images (their ``slots`` in the image ``cache``) and 0/1 labels,
    and the weights the network starts from; for a diagnosis head also the classes (``c_train``, ``c_val``) and
    the head's ``diagnoses``. ``workers``: DataLoader worker processes (``--data-workers``); ``batch_pixels``: of a
    validation batch (half of ``VALIDATION_PIXELS`` where the run saves memory with gradient checkpointing)."""

    cache: ImageCache
    s_train: np.ndarray
    y_train: np.ndarray
    s_val: np.ndarray
    y_val: np.ndarray
    weights: ResolvedWeights
    rescore_train: bool = False  # a second pass of the network over the training set would double the epoch
    c_train: np.ndarray | None = None
    c_val: np.ndarray | None = None
    diagnoses: Diagnoses | None = None
    workers: int = 0
    batch_pixels: int = VALIDATION_PIXELS

    @property
    def n_train(self) -> int:
        return len(self.s_train)

    def describe(self, cfg: TrainConfig) -> str:
        return f"finetune {cfg.backbone}"

    def build(self, cfg: TrainConfig) -> nn.Module:
        model = build_model(self.weights, cfg.seed, dropout=cfg.dropout, diagnoses=self.diagnoses)
        if cfg.grad_checkpointing:  # exact here: fine-tuning freezes BatchNorm (train_mode)
            set_grad_checkpointing(model.backbone)
        return model

    def prepare(self, module: nn.Module) -> None:
        # channels-last lets oneDNN pick its fast convolution kernels (about 2x on CPU, same numbers)
        module.to(memory_format=torch.channels_last)

    def train_mode(self, module: nn.Module) -> None:
        module.train()
        freeze_batchnorm(module.get_submodule("backbone"))

    def feed(self, cfg: TrainConfig, ranks: Ranks, pin_memory: bool = False) -> Feed:
        images = AugmentedImages(self.cache, self.s_train, self.weights.input_size, cfg.augmentation, cfg.seed)
        sampler = EpochBatches(self.n_train, cfg.batch_size, cfg.seed, ranks.rank, ranks.world)
        return _ImageFeed(self, training_loader(images, sampler, self.workers, pin_memory), sampler)

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> Outputs:
        # uint8 in, scaled and normalised on the batch's device; then autocast there (bf16: about 1.5x on CPUs that
        # compute it natively; bf16 or fp16 on a GPU); weights and optimizer stay fp32
        x = to_input(x, self.weights.mean, self.weights.std).contiguous(memory_format=torch.channels_last)
        precision = AUTOCAST.get(cfg.precision)
        with torch.autocast(x.device.type, dtype=precision, enabled=precision is not None):
            logits, z = outputs_of(module, x)
        return logits.float(), None if z is None else z.float()

    def score(self, module: nn.Module, split: str, loss_fn: Loss, ranks: Ranks = Ranks()) -> Scores:
        slots, y, c = (
            (self.s_train, self.y_train, self.c_train) if split == "train" else (self.s_val, self.y_val, self.c_val)
        )
        mine = np.arange(len(slots))[ranks.rank :: ranks.world]
        parts = ranks.gather((mine, *cached_outputs(module, self.cache, slots[mine], self.weights, self.batch_pixels)))
        logits = np.zeros(len(slots), np.float32)
        z = None if parts[0][2] is None else np.zeros((len(slots), parts[0][2].shape[1]), np.float32)
        for rows, part_logits, part_z in parts:
            logits[rows] = part_logits
            if z is not None:
                z[rows] = part_z
        zt, ct = (None, None) if z is None or c is None else (torch.from_numpy(z), torch.from_numpy(c))
        loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y), zt, ct))
        acc = float(((logits > 0) == (y > 0.5)).mean())  # binary accuracy, whatever the head
        return loss, acc, binary_auc(y, logits)


@dataclass
class _ImageFeed:
    """An image source's batches: uint8 images from the DataLoader, with their targets."""

    source: ImageSource
    loader: torch.utils.data.DataLoader
    sampler: EpochBatches
    forked: bool = False  # the persistent workers exist (forked by the first epoch's iter)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        src, size = self.source, self.sampler.batch_size
        self.sampler.set_epoch(epoch)
        with frozen_heap(self.loader.num_workers > 0 and not self.forked):
            batches = iter(self.loader)
        self.forked = self.loader.persistent_workers
        for k, (images, idx) in enumerate(batches):
            n_global = min(size, src.n_train - k * size)
            yield images, torch.from_numpy(src.y_train)[idx], _rows(src.c_train, idx), n_global


def cached_outputs(
    module: nn.Module,
    cache: ImageCache,
    slots: np.ndarray,
    weights: ResolvedWeights,
    batch_pixels: int = VALIDATION_PIXELS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`model_outputs` of the cached images at ``slots``, in batches of ``batch_pixels`` pixels, read from the
    cache four batches at a time: memory stays bounded whatever the number and size of the images."""
    batch = max(1, round(batch_pixels / weights.input_size**2))
    chunk = 4 * batch
    parts = [
        model_outputs(module, cache.read(slots[i : i + chunk]), weights.mean, weights.std, batch)
        for i in range(0, len(slots), chunk)
    ]
    if not parts:
        return np.zeros(0, np.float32), None
    logits = np.concatenate([p[0] for p in parts])
    return logits, None if parts[0][1] is None else np.concatenate([cast(np.ndarray, p[1]) for p in parts])


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def outputs_of(module: nn.Module, x: torch.Tensor) -> Outputs:
    """(binary logits, diagnosis logits or None) of a head (frozen) or a whole classifier (finetune), or of a
    :class:`TrainingOutputs` wrapper (DDP, which only sees ``forward``)."""
    if isinstance(module, Head | LesionClassifier):
        return module.outputs(x)
    return cast(Outputs, module(x))


class TrainingOutputs(nn.Module):
    """``forward`` = the wrapped module's ``outputs`` (binary and diagnosis logits): what DistributedDataParallel
    wraps, since it synchronises gradients only of calls to ``forward``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Outputs:
        return cast(Head | LesionClassifier, self.module).outputs(x)


def _rows(c: np.ndarray | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if c is None else torch.from_numpy(c)[idx]


@torch.inference_mode()
def model_outputs(
    model: nn.Module, images_hwc: np.ndarray, mean: Sequence[float], std: Sequence[float], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """Binary logits (and diagnosis logits, or None) of uint8 N x H x W x 3 images, in eval mode and batches of
    ``batch_size``, on the model's device."""
    model.eval().to(memory_format=torch.channels_last)
    device = module_device(model)

    def outputs(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(normalize(batch, tuple(mean), tuple(std))).contiguous(memory_format=torch.channels_last)
        logits, z = outputs_of(model, to_device(x, device))
        return logits.cpu().numpy(), None if z is None else z.cpu().numpy()

    nothing: tuple[np.ndarray, np.ndarray | None] = (np.zeros(0, np.float32), None)
    return map_batches(outputs, images_hwc, batch_size, empty=nothing)
