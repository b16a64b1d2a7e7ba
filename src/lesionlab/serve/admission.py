"""Admission control: at most N requests own an inference slot, each bounded by a timeout.

A slot is freed when the work really ends, not when the client gave up waiting, so a timed-out
request cannot let more work pile onto the CPU than the cap allows.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from .errors import ServiceError

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

    def _release(self, future: "asyncio.Future") -> None:
        with self._lock:
            self._active -= 1
        if not future.cancelled():
            future.exception()  # retrieved, so a late failure after a timeout is not reported as unhandled

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs ``fn`` on the inference threads; 503 + Retry-After when full or too slow."""
        if not self._acquire():
            raise ServiceError(503, "busy", f"server busy: {self.max_concurrency} requests are already being "
                                            f"processed; retry in {RETRY_AFTER_S} s",
                               {"Retry-After": str(RETRY_AFTER_S)})
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(503, "timeout", f"the request did not finish within {self.timeout_s:g} s; retry "
                                               "later or send a smaller image",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
