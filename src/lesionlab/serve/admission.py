"""Admission control: at most N requests own an inference slot, each bounded by a timeout.

A slot is freed when the work really ends, not when the client gave up waiting, so a timed-out
request cannot let more work pile onto the CPU than the cap allows; a timed-out job that has not started
yet is dropped, so its slot frees at once and no thread spends time on an answer nobody waits for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from lesionlab.serve.errors import ServiceError

T = TypeVar("T")
RETRY_AFTER_S = 1


class Admission:
    def __init__(self, max_concurrency: int, timeout_s: float, threads: int):
        if max_concurrency < 1 or threads < 1 or timeout_s <= 0:
            raise ValueError("max_concurrency and threads must be >= 1 and timeout_s > 0")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="lesionlab-infer")
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def _acquire(self) -> bool:
        with self._lock:
            if self._active >= self.max_concurrency:
                return False
            self._active += 1
            return True

    def _release(self, job: Future) -> None:
        """Done-callback of the job: it finished, or was cancelled before it started."""
        with self._lock:
            self._active -= 1

    @staticmethod
    def _retrieve(waiter: asyncio.Future) -> None:
        if not waiter.cancelled():
            waiter.exception()  # retrieved, so a late failure after a timeout is not reported as unhandled

    def _submit(self, fn: Callable[..., T], *args) -> Future:
        try:
            job = self.executor.submit(fn, *args)
        except RuntimeError:  # shutting down: the slot was never given to a job
            with self._lock:
                self._active -= 1
            raise ServiceError(
                503,
                "shutting_down",
                "the server is shutting down; retry on another instance",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        job.add_done_callback(self._release)
        return job

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs ``fn`` on the inference threads; 503 + Retry-After when full or too slow.

        A request that times out (or whose client goes away) cancels its job, so a job that has not started
        never runs: under overload the threads work only for clients still waiting. A job already running
        cannot be stopped; it keeps its slot until it ends."""
        if not self._acquire():
            raise ServiceError(
                503,
                "busy",
                f"server busy: {self.max_concurrency} requests are already being processed; retry in {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        job = self._submit(fn, *args)
        waiter = asyncio.wrap_future(job)
        waiter.add_done_callback(self._retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.timeout_s)
        except TimeoutError:
            job.cancel()
            raise ServiceError(
                503,
                "timeout",
                f"the request did not finish within {self.timeout_s:g} s; retry later or send a smaller image",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except asyncio.CancelledError:  # the client went away: nobody wants the answer
            job.cancel()
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
