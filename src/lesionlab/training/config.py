"""What a training run is asked to do: one dataclass, checked when it is built.

Each field is also a ``lesionlab train`` option, defined here once: the field's name is the flag
(``batch_size`` -> ``--batch-size``), its default the option's default and its ``help`` metadata the
option's help. The command line derives its options and the run's reproducible command (config.json's
"command") from these fields (``lesionlab.cli.options``), so a new setting is one new field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lesionlab.data.splits import check_fold
from lesionlab.errors import LesionlabError
from lesionlab.models.backbones import DEFAULT_BACKBONE, REGISTRY
from lesionlab.training.augment import canonical_augment

MODES = ("frozen", "finetune")
PRECISIONS = ("fp32", "bf16")
#: binary: one logit, P(malignant). diagnosis: one logit per diagnosis, P(malignant) = the malignant classes' sum.
TARGETS = ("binary", "diagnosis")
#: none, or Shades of Gray (Finlayson & Trezzi 2004, p = 6): each image's illuminant divided out before the network.
COLOR_CONSTANCY = ("none", "shades-of-gray")
#: crop: shorter side to the input size, then a centre crop (keeps the aspect). squash: the whole image to a square,
#: aspect ignored (how isic-kaggle, ham10000 and isic2018-task3-test were made from 600x450 originals).
RESIZE = ("crop", "squash")


class ConfigError(LesionlabError):
    """A training setting out of range or not one of its choices; the message names the setting."""


def setting(default: Any, help: str, *, flag: bool = True, unset: Any = None) -> Any:
    """A TrainConfig field with the help its ``lesionlab train`` option shows.

    ``flag=False``: a setting the library takes but ``train`` does not offer as an option (it keeps its
    default there). ``unset``: the value that means "not given"; the command line spells it as the option's
    absence (the option defaults to None there, and None becomes ``unset`` in the config)."""
    metadata: dict[str, Any] = {"help": help, "flag": flag}
    if unset is not None:
        metadata["unset"] = unset
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    backbone: str = setting(DEFAULT_BACKBONE, f"One of: {', '.join(REGISTRY)}.")
    mode: str = setting("frozen", "frozen (study: backbone fixed, head trained) or finetune.")
    lr: float = setting(1e-3, "Learning rate.")
    epochs: int = setting(20, "Epochs.")
    batch_size: int = setting(32, "Images per optimizer step.")
    seed: int = setting(0, "Training seed (head init, shuffling, augmentation).")
    split_seed: int = setting(0, "Seed of the train/validation split.")
    # not a train option: the folds that --fold and --also-val-fold count (and their help) assume the study's
    # 0.2, i.e. 5 folds; the sweep and library callers may choose another share
    val_fraction: float = setting(
        0.2, "Share of the training images held out for validation: round(1 / val_fraction) folds.", flag=False
    )
    fold: int = setting(
        0,
        "Which of the 5 group-aware folds is validation (0 = the default split; train all five for a "
        "cross-fitted ensemble).",
    )
    also_val_fold: int = setting(
        -1,
        "Validate on this fold too, training on the other three: the inner runs that estimate a cross-fit "
        "ensemble out of fold (bench/nested_threshold.py).",
        unset=-1,  # < 0: no second validation fold
    )
    optimizer: str = setting("adam", "adam (study) or adamw.")
    weight_decay: float = setting(0.0, "Weight decay of the optimizer (adam: L2 penalty; adamw: decoupled).")
    schedule: str = setting("constant", "constant or cosine (with --warmup-epochs).")
    warmup_epochs: float = setting(0.0, "Linear learning-rate warm-up over this many epochs (0 = none).")
    label_smoothing: float = setting(0.0, "Pull the 0/1 training targets towards 0.5 by this share (0 = off).")
    class_weight: bool = setting(False, "Weight the positive class by the class ratio.")
    # not a train option: the study's head has no dropout, and no experiment so far has asked for it
    dropout: float = setting(0.0, "Dropout on the features entering the head.", flag=False)
    augment: str = setting(
        "auto",
        "finetune: auto (dermoscopy), none, dermoscopy (flips, turns, crop, mild colour jitter), or dermoscopy with "
        "extras joined by +: shortcuts (ruler marks, ink strokes, dark corners on both classes), color (stronger "
        "colour and illuminant changes), aspect (one side stretched up to 4/3); e.g. dermoscopy+shortcuts+color.",
    )
    # "auto" is resolved when the config is built, so config.json and its command record what ran
    precision: str = setting("auto", "finetune arithmetic: auto (bf16 where the CPU has it), bf16 or fp32.")
    ema_decay: float = setting(0.0, "finetune: keep and validate an EMA of the weights (e.g. 0.998; 0 = off).")
    target: str = setting(
        "binary",
        "binary (benign/malignant) or diagnosis (one class per diagnosis of the sources that have them; "
        "P(malignant) is the sum over the malignant ones; images with only benign/malignant train that sum).",
    )
    color_constancy: str = setting(
        "none", "none or shades-of-gray: divide out each image's illuminant before the network (also at predict)."
    )
    resize: str = setting(
        "crop", "crop (shorter side, centre crop) or squash (whole image to a square): also how predict reads files."
    )

    def __post_init__(self) -> None:
        """Resolves ``precision="auto"`` and refuses a bad setting with ConfigError (a fold DataError),
        before any data is read."""
        if self.precision == "auto":
            self.precision = "bf16" if self.mode == "finetune" and bf16_supported() else "fp32"
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be auto or one of {PRECISIONS}, got '{self.precision}'")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got '{self.mode}'")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("lr must be > 0, epochs >= 1 and batch size >= 1")
        if self.optimizer not in ("adam", "adamw") or self.schedule not in ("constant", "cosine"):
            raise ConfigError("optimizer must be adam|adamw and schedule constant|cosine")
        check_fold(self.fold, self.val_fraction, self.second_fold)  # raises DataError, also a LesionlabError
        for name, value, choices in (
            ("target", self.target, TARGETS),
            ("color_constancy", self.color_constancy, COLOR_CONSTANCY),
            ("resize", self.resize, RESIZE),
        ):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got '{value}'")
        try:  # one spelling per augmentation: the extras in their canonical order
            self.augment = canonical_augment(self.augment)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0.0 <= self.ema_decay < 1.0 or (self.ema_decay and self.mode != "finetune"):
            raise ConfigError("ema_decay must be in [0, 1) (e.g. 0.998), and only with mode finetune")

    @property
    def second_fold(self) -> int | None:
        return None if self.also_val_fold < 0 else self.also_val_fold

    @property
    def augmentation(self) -> str:
        if self.augment == "auto":
            return "dermoscopy" if self.mode == "finetune" else "none"
        return self.augment


def bf16_supported() -> bool:
    """bf16 autocast is only a speed-up where the CPU computes in bf16 natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
