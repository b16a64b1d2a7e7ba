"""Service settings, and their round trip through environment variables.

``lesionlab serve --workers N`` starts N uvicorn worker processes that each build the app from the
environment (uvicorn can only hand workers an import string), so every knob has a variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Mapping

from ..data import DEFAULT_MAX_PIXELS

PREFIX = "LESIONLAB_SERVE_"
MODEL_ENV = "LESIONLAB_MODEL"


def default_threads(workers: int = 1, inference_threads: int = 2) -> int:
    """Intra-op threads per inference thread: the cores shared out so that no core runs two model threads.

    On 2 cores that is 1 thread for each of 2 concurrent requests, which served more requests per second
    than 1 request at a time on 2 threads (docs/benchmarks.md)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers * inference_threads))


def _flag(raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


@dataclass
class ServeSettings:
    model_dir: str | None = None
    max_body_bytes: int = 10_000_000
    max_concurrency: int = 32
    timeout_s: float = 15.0
    backend: str = "auto"
    num_threads: int | None = None  # ONNX Runtime / torch intra-op threads; None = runtime default
    inference_threads: int = 2  # requests decoded and inferred at once per worker
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 32
    # load the model before the worker takes connections; on with several workers, where a probe answered by
    # one ready worker says nothing about the others sharing the socket
    load_before_accepting: bool = False
    tokens: list[str] = field(default_factory=list, repr=False)

    def to_env(self) -> dict[str, str]:
        """Everything but tokens (those stay in LESIONLAB_API_TOKENS / _FILE, never in our own variables)."""
        env = {MODEL_ENV: self.model_dir} if self.model_dir else {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("model_dir", "tokens") and value is not None:
                env[PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ServeSettings":
        from .middleware import read_tokens

        kwargs: dict = {"model_dir": env.get(MODEL_ENV) or None, "tokens": read_tokens(dict(env))}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or f.name in ("model_dir", "tokens"):
                continue
            kind = {"max_body_bytes": int, "max_concurrency": int, "timeout_s": float, "num_threads": int,
                    "inference_threads": int, "max_pixels": int, "max_batch": int,
                    "load_before_accepting": _flag}.get(f.name, str)
            try:
                kwargs[f.name] = kind(raw)
            except ValueError:
                what = "true/false" if kind is _flag else kind.__name__
                raise ValueError(f"{PREFIX + f.name.upper()}={raw!r} is not a valid {what}") from None
        return cls(**kwargs)
