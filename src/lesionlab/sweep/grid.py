"""The sweep's grid: the study's backbones, learning rates and epoch counts, and the trials a grid makes.

No torch here: the command line builds its ``sweep`` options from these defaults without importing the training
code (``sweep.trials`` runs a trial).
"""

from __future__ import annotations

from dataclasses import dataclass

from lesionlab.errors import LesionlabError
from lesionlab.models.registry import get_spec
from lesionlab.training.config import MODES, TrainConfig

STUDY_BACKBONES = ("mobilenetv2", "resnet50v2", "efficientnetv2b0", "vgg16")
STUDY_LRS = (1e-5, 5e-4, 1e-4, 5e-3, 1e-3)
STUDY_EPOCHS = (10, 20, 30, 40, 50, 100)
TRIAL_THREADS = 1  # the same thread count on every backend keeps results bit-identical across them


class SweepError(LesionlabError):
    """A sweep that cannot start as asked (bad grid, missing optional dependency)."""


@dataclass(frozen=True)
class Trial:
    """One training run: a backbone, a learning rate and a seed, trained to the grid's longest epoch count."""

    backbone: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class SweepGrid:
    """Every (backbone, lr, epochs, seed) to try; the other settings are shared. Checked when built (SweepError)."""

    backbones: tuple[str, ...] = STUDY_BACKBONES
    lrs: tuple[float, ...] = STUDY_LRS
    epochs: tuple[int, ...] = STUDY_EPOCHS
    seeds: tuple[int, ...] = (0,)
    mode: str = "frozen"
    batch_size: int = 32
    split_seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not (self.backbones and self.lrs and self.epochs and self.seeds):
            raise SweepError("the grid needs at least one backbone, learning rate, epoch count and seed")
        for name in self.backbones:
            get_spec(name)  # raises with the list of known backbones
        if any(lr <= 0 for lr in self.lrs) or any(e < 1 for e in self.epochs):
            raise SweepError("learning rates must be > 0 and epoch counts >= 1")
        if self.mode not in MODES:
            raise SweepError(f"mode must be one of {MODES}, got '{self.mode}'")
        object.__setattr__(self, "epochs", tuple(sorted(set(self.epochs))))
        for attr in ("backbones", "lrs", "seeds"):
            object.__setattr__(self, attr, tuple(dict.fromkeys(getattr(self, attr))))

    @property
    def max_epochs(self) -> int:
        return self.epochs[-1]

    def trials(self) -> list[Trial]:
        return [Trial(b, lr, s) for b in self.backbones for lr in self.lrs for s in self.seeds]

    def config(self, trial: Trial, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(
            backbone=trial.backbone,
            mode=self.mode,
            lr=trial.lr,
            epochs=epochs or self.max_epochs,
            batch_size=self.batch_size,
            seed=trial.seed,
            split_seed=self.split_seed,
            val_fraction=self.val_fraction,
            device="cpu",  # trials run in CPU worker processes (and Ray tasks), several at a time
        )
