"""What a training run is asked to do: one dataclass, checked when it is built.

Each field is also a ``lesionlab train`` option, defined here once: the field's name is the flag
(``batch_size`` -> ``--batch-size``), its default the option's default and its ``help`` metadata the
option's help. The command line derives its options and the run's reproducible command (config.json's
"command") from these fields (``lesionlab.cli.options``), so a new setting is one new field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lesionlab.data.splits import check_fold
from lesionlab.errors import LesionlabError
from lesionlab.models.registry import DEFAULT_BACKBONE, REGISTRY
from lesionlab.training.augment_names import canonical_augment

MODES = ("frozen", "finetune")
PRECISIONS = ("fp32", "bf16", "fp16")
#: --device: auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda (the current GPU), cuda:N or mps.
DEVICE_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
#: Where each epoch's metrics also go (``tracking.py``); the run folder is the record either way.
LOGS = ("none", "tensorboard", "mlflow")
#: binary: one logit, P(malignant). diagnosis: one logit per diagnosis, P(malignant) = the malignant classes' sum.
TARGETS = ("binary", "diagnosis")
#: none, or Shades of Gray (Finlayson & Trezzi 2004, p = 6): each image's illuminant divided out before the network.
COLOR_CONSTANCY = ("none", "shades-of-gray")
#: crop: shorter side to the input size, then a centre crop (keeps the aspect). squash: the whole image to a square,
#: aspect ignored (how isic-kaggle, ham10000 and isic2018-task3-test were made from 600x450 originals).
RESIZE = ("crop", "squash")


class ConfigError(LesionlabError):
    """A training setting out of range or not one of its choices; the message names the setting."""


def setting(default: Any, help: str, *, flag: bool = True, unset: Any = None, identity: bool = True) -> Any:
    """A TrainConfig field with the help its ``lesionlab train`` option shows.

    ``flag=False``: a setting the library takes but ``train`` does not offer as an option (it keeps its
    default there). ``unset``: the value that means "not given"; the command line spells it as the option's
    absence (the option defaults to None there, and None becomes ``unset`` in the config). ``identity=False``:
    where the run computes or reports, not what: recorded, but a run resumed with another value is the same run
    (:func:`identity_settings`)."""
    metadata: dict[str, Any] = {"help": help, "flag": flag, "identity": identity}
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
    device: str = setting(
        "auto",
        "Where to train: auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda, cuda:N or mps. Recorded "
        "(config.json's compute block) but not part of the run's identity: a run resumes on another device.",
        identity=False,
    )
    # "auto" is resolved when the config is built, so config.json and its command record what ran
    precision: str = setting(
        "auto",
        "finetune arithmetic: auto (CPU: bf16 where the CPU computes it natively, else fp32; CUDA: bf16 where the "
        "GPU has it, else fp16), bf16, fp16 (CUDA only, with a gradient scaler) or fp32.",
    )
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
    input_size: int = setting(
        0,
        "Input size in pixels, e.g. 384 (0 = the backbone's own, 224 for most). Predict, export and serve read it "
        "from the run.",
        unset=0,
    )
    data_workers: int = setting(
        -1,
        "finetune: DataLoader worker processes that read the image cache and augment (0 = in the training "
        "process; default: the cores but one, at most 8). Results do not depend on it (each image's augmentation "
        "is seeded by seed, epoch and image). Not part of the run's identity.",
        unset=-1,
        identity=False,
    )
    max_steps: int = setting(
        0,
        "Stop after this many optimizer steps (0 = train all epochs; the schedule stays that of all epochs): for "
        "benchmarks and smoke tests.",
        unset=0,
    )
    grad_checkpointing: bool = setting(
        False,
        "finetune: keep only each block's input and recompute the block in the backward pass: about half the "
        "activation memory (large inputs on a small machine, bigger batches on a GPU), training about a fifth "
        "slower on a CPU; the same weights. Not part of the run's identity.",
        identity=False,
    )
    log: str = setting(
        "none",
        "Also send each epoch's metrics to none, tensorboard (RUN/tensorboard/; pip install 'lesionlab[tensorboard]') "
        "or mlflow (pip install 'lesionlab[mlflow]'); the run folder stays the record. Not part of the run's identity.",
        identity=False,
    )
    log_uri: str = setting(
        "",
        "--log mlflow: the tracking URI (default: a local mlruns/ folder in the current directory).",
        unset="",
        identity=False,
    )

    def __post_init__(self) -> None:
        """Resolves ``precision="auto"`` and refuses a bad setting with ConfigError (a fold DataError),
        before any data is read. Whether the device is there is checked when training starts
        (``device.resolve_device``), so that a GPU run's config is still read on a machine without one."""
        if not DEVICE_SPEC.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{self.device}'")
        kind = device_type(self.device)
        if self.precision == "auto":
            self.precision = auto_precision(self.mode, kind)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be auto or one of {PRECISIONS}, got '{self.precision}'")
        if self.precision == "fp16" and kind != "cuda":
            raise ConfigError(
                f"precision fp16 needs a CUDA device (its gradient scaler is CUDA's); the device here is {kind}: "
                "use bf16 or fp32"
            )
        if self.log not in LOGS:
            raise ConfigError(f"log must be one of {LOGS}, got '{self.log}'")
        if self.log_uri and self.log != "mlflow":
            raise ConfigError("log_uri is MLflow's tracking URI: give it with log mlflow")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got '{self.mode}'")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("lr must be > 0, epochs >= 1 and batch size >= 1")
        if self.input_size and not 32 <= self.input_size <= 2048:
            raise ConfigError(f"input_size must be 0 (the backbone's) or 32 to 2048 pixels, got {self.input_size}")
        if self.data_workers < -1 or self.max_steps < 0:
            raise ConfigError("data_workers must be >= 0 (or -1: the default) and max_steps >= 0")
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
        if self.grad_checkpointing and self.mode != "finetune":
            raise ConfigError("grad_checkpointing saves activation memory in fine-tuning: only with mode finetune")
        if self.grad_checkpointing and self.backbone in REGISTRY and not REGISTRY[self.backbone].grad_checkpointing:
            raise ConfigError(f"{self.backbone} does not support grad_checkpointing (timm cannot recompute its layers)")

    @property
    def second_fold(self) -> int | None:
        return None if self.also_val_fold < 0 else self.also_val_fold

    @property
    def workers(self) -> int:
        """``data_workers`` resolved: -1 means the cores but one, at most 8."""
        return default_workers() if self.data_workers < 0 else self.data_workers

    @property
    def augmentation(self) -> str:
        if self.augment == "auto":
            return "dermoscopy" if self.mode == "finetune" else "none"
        return self.augment


#: The settings that are not part of a run's identity (``setting(..., identity=False)``).
NOT_IDENTITY = frozenset(f.name for f in fields(TrainConfig) if not f.metadata["identity"])


def identity_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """A train block (config.json's, or ``asdict`` of a TrainConfig) without the settings that say where a run
    computes or reports (the device, the tracker): what two runs must share to be the same run."""
    return {k: v for k, v in train.items() if k not in NOT_IDENTITY}


def default_workers() -> int:
    """DataLoader workers by default: the cores beyond the one the training step keeps busy, at most 8 (0 on a
    single core)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def device_type(device: str) -> str:
    """cpu, cuda or mps: the kind of device a ``--device`` value names (auto: cuda when a CUDA GPU is visible)."""
    if device == "auto":
        import torch  # here, not at the top: the command line reads the settings without torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def auto_precision(mode: str, kind: str) -> str:
    """What ``precision="auto"`` means for ``mode`` on a device of ``kind``: fp32 for frozen (the head trains on
    cached fp32 features); finetune: bf16 where the device computes it natively, else fp16 on a GPU (with a
    gradient scaler) and fp32 on a CPU or Apple GPU."""
    if mode != "finetune":
        return "fp32"
    if kind == "cuda":
        return "bf16" if cuda_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if bf16_supported() else "fp32"
    return "fp32"


def cuda_bf16_supported() -> bool:
    """The current CUDA GPU computes bf16 natively (Ampere and later; not the slow emulation of older GPUs)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def bf16_supported() -> bool:
    """bf16 autocast is only a speed-up where the CPU computes in bf16 natively (AVX512-BF16 / AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
