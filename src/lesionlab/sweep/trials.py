"""The sweep's grid and its unit of work, below every backend: a *trial* is one training run per
(backbone, lr, seed) to the grid's longest epoch count, recording the model state at each epoch count of the grid.

:func:`run_trial` trains with :func:`lesionlab.training.loop.train_epochs`, whose epochs draw their randomness from
(seed, epoch) only; with the constant schedule, which does not depend on the planned length, the state after E
epochs is, bit for bit, the state a separate E-epoch run ends with at the same thread count
(``tests/test_sweep.py`` checks this). A :class:`Backend` runs a list of jobs (local processes, Ray tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from lesionlab.errors import LesionlabError
from lesionlab.models.backbones import get_spec
from lesionlab.training.config import MODES, TrainConfig
from lesionlab.training.loop import train_epochs
from lesionlab.training.sources import FeatureSource, ImageSource

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


#: What a trial trains on: features (frozen) or uint8 images and starting weights (finetune). Picklable, for Ray.
TrialData = FeatureSource | ImageSource


@dataclass
class TrialResult:
    trial: Trial
    history: list[dict]  # every epoch, as in history.csv
    states: dict[int, dict[str, torch.Tensor]]  # requested epoch -> model state (the head, in frozen mode)


#: One trial to run: its config (to the longest epoch count), its data, and the epoch counts to record.
Job = tuple[TrainConfig, TrialData, tuple[int, ...]]


class Backend(Protocol):
    """Runs ``jobs``, calling ``on_done`` with each finished trial (in the calling process) and ``tick`` with
    epochs done (progress)."""

    def __call__(
        self, jobs: list[Job], on_done: Callable[[TrialResult], None], tick: Callable[[int], None]
    ) -> None: ...


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_trial(
    cfg: TrainConfig, data: TrialData, record: tuple[int, ...], tick: Callable[[int], None] | None = None
) -> TrialResult:
    """Trains once to ``cfg.epochs``, keeping a copy of the state at each epoch in ``record``.

    Frozen trials run on TRIAL_THREADS threads, whatever the process has (float sums depend on the thread count);
    finetune trials use every thread of their process."""
    history: list[dict] = []
    states: dict[int, dict[str, torch.Tensor]] = {}
    with torch_threads(TRIAL_THREADS if cfg.mode == "frozen" else torch.get_num_threads()):
        for ep in train_epochs(data, cfg, progress=False):
            history.append(ep.result.row())
            if ep.result.epoch in record:
                states[ep.result.epoch] = {k: v.detach().cpu().clone() for k, v in ep.judged.state_dict().items()}
            if tick:
                tick(1)
    return TrialResult(Trial(cfg.backbone, cfg.lr, cfg.seed), history, states)
