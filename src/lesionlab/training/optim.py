"""The pieces of one optimisation step both transfer modes share: loss, optimizer and schedule, weight EMA,
the per-epoch random generator, and the AUC of a validation pass."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from lesionlab.training.config import TrainConfig

#: loss(binary logits, 0/1 targets, diagnosis logits or None, diagnosis classes or None) -> the batch's mean loss.
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def binary_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for 0/1 labels ``y``; NaN when ``y`` holds one class only."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def make_loss(cfg: TrainConfig, y_train: np.ndarray) -> Loss:
    """Binary cross-entropy on logits, with the config's class weight (from ``y_train``) and label smoothing.

    With diagnosis logits and classes (``--target diagnosis``), each image with a diagnosis (class >= 0) costs
    the cross-entropy over the diagnoses (label smoothing spread over the K classes), and each image with only a
    benign/malignant label (class -1) the binary cross-entropy of the head's binary logit; the batch's loss is
    the mean over all its images. The class weight then weights every malignant image, in either term.

    The loss is computed on the logits' device (the class weight is copied there once per device)."""
    pos_weight = None
    if cfg.class_weight:
        pos = float(y_train.sum())
        pos_weight = torch.tensor((len(y_train) - pos) / max(pos, 1.0))
    on_device: dict[torch.device, torch.Tensor] = {}

    def weight_on(device: torch.device) -> torch.Tensor | None:
        if pos_weight is None or device.type == "cpu":
            return pos_weight
        if device not in on_device:
            with torch.inference_mode(False):  # a copy made while validating must still serve training steps
                on_device[device] = pos_weight.to(device)
        return on_device[device]

    def smoothed(y: torch.Tensor) -> torch.Tensor:
        return y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing if cfg.label_smoothing else y

    def loss(
        logits: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = weight_on(logits.device)
        if z is None or c is None:  # what nn.BCEWithLogitsLoss(pos_weight=...) computes
            return nn.functional.binary_cross_entropy_with_logits(logits, smoothed(y), pos_weight=weight)
        known = c >= 0
        per_image = torch.zeros_like(logits)
        if known.any():
            per_image[known] = nn.functional.cross_entropy(
                z[known], c[known], reduction="none", label_smoothing=cfg.label_smoothing
            )
        if not known.all():
            per_image[~known] = nn.functional.binary_cross_entropy_with_logits(
                logits[~known], smoothed(y[~known]), reduction="none"
            )
        if weight is not None:
            per_image = per_image * torch.where(y > 0.5, weight, torch.ones_like(y))
        return per_image.mean()

    return loss


def make_optimizer(
    cfg: TrainConfig, params: Iterable[nn.Parameter], steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam or AdamW, and a per-step schedule: linear warm-up, then constant or cosine over ``cfg.epochs``."""
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Each epoch's randomness depends only on (seed, epoch), so a resumed run equals an unbroken one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def make_ema(model: nn.Module, decay: float):
    """timm's weight EMA with warm-up (the average forgets the ImageNet start quickly), or None when off.

    It smooths the last epochs' noise, so the epoch picked on validation depends less on luck."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)
