"""What the training loop trains on: a data source per transfer mode, both behind one small contract.

- :class:`FeatureSource` (``frozen``): cached backbone feature vectors (``features.py``); the trainable module is
  the head alone, so an epoch takes seconds.
- :class:`ImageSource` (``finetune``): decoded uint8 images, augmented per batch after the source; the trainable
  module is the whole network. BatchNorm layers of the backbone stay in eval mode (their running statistics are
  frozen; their scale and shift still learn), because batches of 32 dermoscopy images are too small and too unlike
  ImageNet to re-estimate them, and because some weights (the Coral MobileNetV2) have BatchNorm folded into the
  convolutions.

Sources are plain arrays plus settings, so they pickle (sweep trials run in worker processes and Ray tasks).
Besides the 0/1 labels, a ``--target diagnosis`` source holds each image's diagnosis class (``targets.py``; -1
where only benign/malignant is known) and the head's classes; a binary source holds neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn

from lesionlab.data.dataset import Dataset, Sample
from lesionlab.data.images import normalize
from lesionlab.models.backbones import ResolvedWeights
from lesionlab.models.batching import map_batches
from lesionlab.models.classifier import Diagnoses, Head, LesionClassifier, build_model
from lesionlab.training.augment import augment_batch, to_input
from lesionlab.training.config import TrainConfig
from lesionlab.training.device import AUTOCAST, module_device, to_device
from lesionlab.training.features import BadDataError, input_preprocessing, load_or_compute
from lesionlab.training.optim import Loss, binary_auc
from lesionlab.training.targets import class_index

Scores = tuple[float, float, float]  # loss, accuracy, AUC
#: A batch's float32 binary logits (N,), and its diagnosis logits (N, K) from a diagnosis head, else None.
Outputs = tuple[torch.Tensor, torch.Tensor | None]


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

    def batch(self, idx: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, float 0/1 targets and (diagnosis target only, else None) int64 diagnosis classes, -1 where
        unknown, of the training items ``idx``."""
        ...

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> Outputs:
        """float32 binary logits of a training batch, and its diagnosis logits (None for a binary head)."""
        ...

    def score(self, module: nn.Module, split: str, loss_fn: Loss) -> Scores:
        """Loss, accuracy and AUC of ``module`` on ``split`` (train or val), in eval mode."""
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

    def order(self, g: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.n_train, generator=g)

    def batch(self, idx: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return torch.from_numpy(self.x_train)[idx], torch.from_numpy(self.y_train)[idx], _rows(self.c_train, idx)

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> Outputs:
        return outputs_of(module, x)  # fp32 whatever cfg.precision says: vectors gain nothing from bf16

    @torch.inference_mode()
    def score(self, module: nn.Module, split: str, loss_fn: Loss) -> Scores:
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
class ImageSource:
    """Finetune mode: uint8 N x H x W x 3 images and 0/1 labels, and the weights the network starts from; for a
    diagnosis head also the classes (``c_train``, ``c_val``) and the head's ``diagnoses``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    weights: ResolvedWeights
    rescore_train: bool = False  # a second pass of the network over the training set would double the epoch
    c_train: np.ndarray | None = None
    c_val: np.ndarray | None = None
    diagnoses: Diagnoses | None = None

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def describe(self, cfg: TrainConfig) -> str:
        return f"finetune {cfg.backbone}"

    def build(self, cfg: TrainConfig) -> nn.Module:
        return build_model(self.weights, cfg.seed, dropout=cfg.dropout, diagnoses=self.diagnoses)

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

    def batch(self, idx: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        images = torch.from_numpy(self.x_train).permute(0, 3, 1, 2)[idx]
        if cfg.augmentation != "none":  # dermoscopy, with or without extras
            images = augment_batch(images, self.weights.input_size, cfg.augmentation)
        x = to_input(images, self.weights.mean, self.weights.std).contiguous(memory_format=torch.channels_last)
        return x, torch.from_numpy(self.y_train)[idx], _rows(self.c_train, idx)

    def forward(self, module: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> Outputs:
        # autocast on the batch's device (bf16: about 1.5x on CPUs that compute it natively; bf16 or fp16 on a GPU);
        # weights and optimizer stay fp32
        precision = AUTOCAST.get(cfg.precision)
        with torch.autocast(x.device.type, dtype=precision, enabled=precision is not None):
            logits, z = outputs_of(module, x)
        return logits.float(), None if z is None else z.float()

    def score(self, module: nn.Module, split: str, loss_fn: Loss) -> Scores:
        images, y, c = (
            (self.x_train, self.y_train, self.c_train) if split == "train" else (self.x_val, self.y_val, self.c_val)
        )
        logits, z = model_outputs(module, images, self.weights.mean, self.weights.std)
        zt, ct = (None, None) if z is None or c is None else (torch.from_numpy(z), torch.from_numpy(c))
        loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y), zt, ct))
        acc = float(((logits > 0) == (y > 0.5)).mean())  # binary accuracy, whatever the head
        return loss, acc, binary_auc(y, logits)


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def outputs_of(module: nn.Module, x: torch.Tensor) -> Outputs:
    """(binary logits, diagnosis logits or None) of a head (frozen) or a whole classifier (finetune)."""
    return cast(Head | LesionClassifier, module).outputs(x)


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

    def classes(self, samples: list[Sample], diagnoses: Diagnoses) -> np.ndarray:
        """The diagnosis classes of the rows ``rows`` gives (-1: no diagnosis)."""
        readable = set(self.relpaths)
        return class_index([s for s in samples if s.relpath in readable], diagnoses)

    def source(
        self, splits: dict[str, list[Sample]], diagnoses: Diagnoses | None = None
    ) -> FeatureSource | ImageSource:
        """The training source of ``splits`` (its train and val lists); with ``diagnoses``, a diagnosis head's."""
        (x_tr, y_tr), (x_va, y_va) = self.rows(splits["train"]), self.rows(splits["val"])
        c_tr = None if diagnoses is None else self.classes(splits["train"], diagnoses)
        c_va = None if diagnoses is None else self.classes(splits["val"], diagnoses)
        if self.mode == "frozen":
            return FeatureSource(x_tr, y_tr, x_va, y_va, c_train=c_tr, c_val=c_va, diagnoses=diagnoses)
        return ImageSource(x_tr, y_tr, x_va, y_va, self.weights, c_train=c_tr, c_val=c_va, diagnoses=diagnoses)


def read_inputs(
    dataset: Dataset,
    weights: ResolvedWeights,
    mode: str,
    seed: int,
    skip_bad: bool,
    progress: bool,
    resize: str = "crop",
    color_constancy: str = "none",
) -> Inputs:
    """Cached features (frozen) or decoded images (finetune) of every file, decoded by ``resize`` and
    colour-corrected by ``color_constancy`` (TrainConfig's settings); BadDataError on unreadable files unless
    ``skip_bad``. Finetune images are colour-corrected here, once, so augmentation starts from corrected images
    (as predictors correct before normalising)."""
    if mode == "frozen":
        table = load_or_compute(
            dataset, weights, seed, skip_bad, progress, resize=resize, color_constancy=color_constancy
        )
        return Inputs(mode, weights, table.relpaths, table.features, table.bad)
    pre = input_preprocessing(weights, resize, color_constancy)
    decoded = pre.decode(dataset.all, progress)
    if decoded.bad and not skip_bad:
        raise BadDataError(decoded.bad)
    bad = [(e.path, e.reason) for e in decoded.bad]
    return Inputs(mode, weights, [s.relpath for s in decoded.samples], pre.corrected(decoded.images), bad)
