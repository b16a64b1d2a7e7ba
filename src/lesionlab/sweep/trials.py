"""The sweep's unit of work, below every backend (the grid is ``sweep.grid``): a *trial* is one training run per
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

from lesionlab.sweep.grid import TRIAL_THREADS, Trial
from lesionlab.training.config import TrainConfig
from lesionlab.training.loop import train_epochs
from lesionlab.training.sources import FeatureSource, ImageSource

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
