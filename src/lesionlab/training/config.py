"""What a training run is asked to do: one dataclass, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lesionlab.data.splits import check_fold

MODES = ("frozen", "finetune")


@dataclass
class TrainConfig:
    backbone: str = "efficientnet_lite0"
    mode: str = "frozen"
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.2
    fold: int = 0  # which of the round(1 / val_fraction) group-aware folds is validation (0 = the default split)
    also_val_fold: int = -1  # >= 0: a second validation fold (the inner runs of a nested cross-fit)
    optimizer: str = "adam"  # the study's Keras default; "adamw" for the fine-tuning recipe
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine" (with linear warm-up)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_weight: bool = False
    dropout: float = 0.0
    augment: str = "auto"  # "auto" = on in finetune, off in frozen; or "none" / "dermoscopy"
    precision: str = "auto"  # finetune only: "bf16" autocast where the CPU has it ("auto"), else "fp32"
    ema_decay: float = 0.0  # finetune only: >0 evaluates and keeps an exponential moving average of the weights

    def __post_init__(self):
        if self.precision == "auto":
            self.precision = "bf16" if self.mode == "finetune" and bf16_supported() else "fp32"
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {PRECISIONS}, got '{self.precision}'")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{self.mode}'")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, epochs >= 1 and batch size >= 1")
        if self.optimizer not in ("adam", "adamw") or self.schedule not in ("constant", "cosine"):
            raise ValueError("optimizer must be adam|adamw and schedule constant|cosine")
        check_fold(self.fold, self.val_fraction, self.second_fold)  # DataError is a ValueError
        if not 0.0 <= self.ema_decay < 1.0 or (self.ema_decay and self.mode != "finetune"):
            raise ValueError("ema_decay must be in [0, 1) (e.g. 0.998), and only with mode finetune")

    @property
    def second_fold(self) -> int | None:
        return None if self.also_val_fold < 0 else self.also_val_fold

    @property
    def augmentation(self) -> str:
        if self.augment == "auto":
            return "dermoscopy" if self.mode == "finetune" else "none"
        return self.augment


PRECISIONS = ("fp32", "bf16")


def bf16_supported() -> bool:
    """bf16 autocast is only a speed-up where the CPU computes in bf16 natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
