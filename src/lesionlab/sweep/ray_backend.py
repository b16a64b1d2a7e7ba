"""The sweep's Ray backend: the same trials as the local backend, run as Ray tasks (``pip install 'lesionlab[ray]'``).

The driver prepares features (or images) once per (backbone, seed) and puts each array set in
Ray's object store once; every task runs :func:`lesionlab.sweep.trials.run_trial`, the function the local
backend runs, with the same thread count, so results.csv is identical. Tasks return their results
and the driver writes the trial files, so workers need no access to SWEEP_DIR. Workers do need
lesionlab installed (the same version as the driver).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lesionlab.sweep.grid import SweepError
from lesionlab.sweep.trials import Backend, Job, TrialData, TrialResult, run_trial
from lesionlab.training.config import TrainConfig


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs Ray: pip install 'lesionlab[ray]' (or ray[default]>=2.9)") from None
    return ray


def _trial_task(cfg: TrainConfig, data: TrialData, record: tuple[int, ...]) -> TrialResult:
    return run_trial(cfg, data, record)


def ray_backend(address: str | None = None, num_cpus: int | None = None, gpus_per_trial: float = 0.0) -> Backend:
    """A backend that connects to the Ray cluster at ``address`` (None: start a local one; 'auto': the running one).

    ``gpus_per_trial`` > 0: each trial asks Ray for that share of a GPU (0.25: four trials per GPU) and trains on
    it (``device=cuda``; the device is not part of a trial's result, only where it computes).

    When lesionlab starts Ray it also shuts it down; a Ray already initialised by the caller is used as is.
    """
    if gpus_per_trial < 0:
        raise SweepError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial}")
    ray = _import_ray()

    def run(jobs: list[Job], on_done: Callable[[TrialResult], None], tick: Callable[[int], None]) -> None:
        if not jobs:
            return
        started = not ray.is_initialized()
        if started:
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        try:
            # run_trial pins frozen trials to TRIAL_THREADS threads
            task = ray.remote(num_cpus=1, num_gpus=gpus_per_trial)(_trial_task)
            refs: dict[int, object] = {}  # one object-store copy per (backbone, seed) data set
            pending = {}
            for cfg, data, record in jobs:
                if gpus_per_trial > 0:
                    cfg = dataclasses.replace(cfg, device="cuda")
                ref = refs.setdefault(id(data), ray.put(data))
                pending[task.remote(cfg, ref, record)] = cfg.epochs
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                epochs = pending.pop(done[0])
                on_done(ray.get(done[0]))
                tick(epochs)
        finally:
            if started:
                ray.shutdown()

    return run
