"""The sweep's local backend: trials in this process, or (frozen mode) in worker processes."""

from __future__ import annotations

import os
from collections.abc import Callable

from lesionlab.sweep.trials import Backend, Job, TrialResult, run_trial


def local_backend(workers: int | None = None) -> Backend:
    """Trials in this process, or (frozen mode) in ``workers`` processes, one thread each: the same numbers.

    A frozen trial is a small single-threaded loop, so one process per core keeps every core busy.
    Finetune trials use every thread of one process instead (and their images are too big to copy).
    """

    def run(jobs: list[Job], on_done: Callable[[TrialResult], None], tick: Callable[[int], None]) -> None:
        n = min(workers or os.cpu_count() or 1, len(jobs))
        if n <= 1 or jobs[0][0].mode != "frozen":
            for cfg, data, record in jobs:
                on_done(run_trial(cfg, data, record, tick))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent's OpenMP threads (feature extraction) do not survive a fork safely
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(run_trial, cfg, data, record): cfg.epochs for cfg, data, record in jobs}
            for fut in as_completed(futures):
                on_done(fut.result())
                tick(futures[fut])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return run
