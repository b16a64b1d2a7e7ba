"""What the training loop trains on: a data source per transfer mode, both behind one small contract.

- :class:`FeatureSource` (``frozen``): cached backbone feature vectors (``features.py``); the trainable module is
  the head alone, so an epoch takes seconds.
- :class:`ImageSource` (``finetune``): decoded uint8 images, augmented per batch after the source; the trainable
  module is the whole network. BatchNorm layers of the backbone stay in eval mode (their running statistics are
  frozen; their scale and shift still learn), because batches of 32 dermoscopy images are too small and too unlike
  ImageNet to re-estimate them, and because some weights (the Coral MobileNetV2) have BatchNorm folded into the
  convolutions.

Sources are plain arrays plus settings, so they pickle (sweep trials run in worker processes and Ray tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from lesionlab.data.dataset import Dataset, Sample
from lesionlab.data.images import decode_samples, normalize
from lesionlab.models.backbones import ResolvedWeights
from lesionlab.models.batching import map_batches
from lesionlab.models.classifier import Head, build_model
from lesionlab.training.augment import augment_batch, to_input
from lesionlab.training.config import TrainConfig
from lesionlab.training.features import BadDataError, load_or_compute
from lesionlab.training.optim import Loss, binary_auc

Scores = tuple[float, float, float]  # loss, accuracy, AUC


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

    def order(self, g: torch.Generator) -> torch.Tensor:
        """This epoch's permutation of the training set, drawn from the epoch's generator ``g``."""
        ...

    def batch(self, idx: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and float 0/1 targets of the training items ``idx``."""
        ...

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        """float32 logits of a training batch."""
        ...

    def score(self, module: nn.Module, split: str, loss_fn: Loss) -> Scores:
        """Loss, accuracy and AUC of ``module`` on ``split`` (train or val), in eval mode."""
        ...


@dataclass
class FeatureSource:
    """Frozen mode: feature vectors (float32 N x D) and 0/1 labels of the training and validation images."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    rescore_train: bool = True

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def describe(self, cfg: TrainConfig) -> str:
        return "train head"

    def build(self, cfg: TrainConfig) -> nn.Module:
        torch.manual_seed(cfg.seed + 1)  # as build_model seeds its head: the same head in both modes
        return Head(self.x_train.shape[1], dropout=cfg.dropout)

    def prepare(self, module: nn.Module) -> None:
        pass

    def train_mode(self, module: nn.Module) -> None:
        module.train()

    def order(self, g: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.n_train, generator=g)

    def batch(self, idx: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x_train)[idx], torch.from_numpy(self.y_train)[idx]

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        return module(x)  # fp32 whatever cfg.precision says: vectors gain nothing from bf16

    @torch.inference_mode()
    def score(self, module: nn.Module, split: str, loss_fn: Loss) -> Scores:
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_val, self.y_val)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        module.eval()
        logits = module(xt)
        loss = float(loss_fn(logits, yt))
        acc = float(((logits > 0).float() == yt).float().mean())
        return loss, acc, binary_auc(y, logits.numpy())


@dataclass
class ImageSource:
    """Finetune mode: uint8 N x H x W x 3 images and 0/1 labels, and the weights the network starts from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    weights: ResolvedWeights
    rescore_train: bool = False  # a second pass of the network over the training set would double the epoch

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def describe(self, cfg: TrainConfig) -> str:
        return f"finetune {cfg.backbone}"

    def build(self, cfg: TrainConfig) -> nn.Module:
        return build_model(self.weights, cfg.seed, dropout=cfg.dropout)

    def prepare(self, module: nn.Module) -> None:
        # channels-last lets oneDNN pick its fast convolution kernels (about 2x on CPU, same numbers)
        module.to(memory_format=torch.channels_last)

    def train_mode(self, module: nn.Module) -> None:
        module.train()
        freeze_batchnorm(module.get_submodule("backbone"))

    def order(self, g: torch.Generator) -> torch.Tensor:
        # the augmentation draws (torch's global generator) are seeded from the epoch's generator first, so they
        # too depend only on (seed, epoch)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        return torch.randperm(self.n_train, generator=g)

    def batch(self, idx: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(self.x_train).permute(0, 3, 1, 2)[idx]
        if cfg.augmentation == "dermoscopy":
            images = augment_batch(images, self.weights.input_size)
        x = to_input(images, self.weights.mean, self.weights.std).contiguous(memory_format=torch.channels_last)
        return x, torch.from_numpy(self.y_train)[idx]

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        # bf16 autocast: about 1.5x on CPUs that compute bf16 natively; weights and optimizer stay fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = module(x)
        return logits.float()

    def score(self, module: nn.Module, split: str, loss_fn: Loss) -> Scores:
        images, y = (self.x_train, self.y_train) if split == "train" else (self.x_val, self.y_val)
        logits = model_logits(module, images, self.weights.mean, self.weights.std)
        loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y)))
        acc = float(((logits > 0) == (y > 0.5)).mean())
        return loss, acc, binary_auc(y, logits)


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.inference_mode()
def model_logits(
    model: nn.Module, images_hwc: np.ndarray, mean: Sequence[float], std: Sequence[float], batch_size: int = 64
) -> np.ndarray:
    """Logits of uint8 N x H x W x 3 images, in eval mode and batches of ``batch_size``."""
    model.eval().to(memory_format=torch.channels_last)

    def logits(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize(batch, tuple(mean), tuple(std))).contiguous(memory_format=torch.channels_last)
        return model(x).numpy()

    return map_batches(logits, images_hwc, batch_size, empty=np.zeros(0, np.float32))


# ------------------------------------------------------------------ a dataset read once, split later


@dataclass
class Inputs:
    """A dataset's readable files as training reads them (feature vectors or decoded images), and the others.

    Read once per (backbone, seed); :meth:`source` then picks the rows of a split."""

    mode: str
    weights: ResolvedWeights
    relpaths: list[str]
    arrays: np.ndarray  # frozen: float32 N x D features; finetune: uint8 N x H x W x 3 images
    bad: list[tuple[str, str]]  # (relpath, reason) of the files that could not be decoded

    def rows(self, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
        index = {r: i for i, r in enumerate(self.relpaths)}
        keep = [s for s in samples if s.relpath in index]
        return self.arrays[[index[s.relpath] for s in keep]], np.array([s.label for s in keep], np.float32)

    def source(self, splits: dict[str, list[Sample]]) -> FeatureSource | ImageSource:
        """The training source of ``splits`` (its train and val lists)."""
        (x_tr, y_tr), (x_va, y_va) = self.rows(splits["train"]), self.rows(splits["val"])
        if self.mode == "frozen":
            return FeatureSource(x_tr, y_tr, x_va, y_va)
        return ImageSource(x_tr, y_tr, x_va, y_va, self.weights)


def read_inputs(
    dataset: Dataset, weights: ResolvedWeights, mode: str, seed: int, skip_bad: bool, progress: bool
) -> Inputs:
    """Cached features (frozen) or decoded images (finetune) of every file; BadDataError on unreadable files
    unless ``skip_bad``."""
    if mode == "frozen":
        table = load_or_compute(dataset, weights, seed, skip_bad, progress)
        return Inputs(mode, weights, table.relpaths, table.features, table.bad)
    decoded = decode_samples(dataset.all, weights.input_size, progress)
    if decoded.bad and not skip_bad:
        raise BadDataError(decoded.bad)
    bad = [(e.path, e.reason) for e in decoded.bad]
    return Inputs(mode, weights, [s.relpath for s in decoded.samples], decoded.images, bad)
