"""Service settings, and their round trip through environment variables.

``lesionlab serve --workers N`` starts N uvicorn worker processes that each build the app from the
environment (uvicorn can only hand workers an import string), so every knob has a variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from lesionlab.data.images import DEFAULT_MAX_PIXELS
from lesionlab.inference.predictor import BACKENDS

PREFIX = "LESIONLAB_SERVE_"
MODEL_ENV = "LESIONLAB_MODEL"
#: ``lesionlab serve`` option of each setting that has one, for error messages
CLI_OPTIONS = {
    "max_body_bytes": "--max-body-bytes",
    "max_concurrency": "--max-concurrency",
    "timeout_s": "--timeout",
    "backend": "--backend",
    "num_threads": "--threads",
    "inference_threads": "--inference-threads",
}
POSITIVE = ("max_body_bytes", "max_concurrency", "num_threads", "inference_threads", "max_pixels", "max_batch")


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


def _option(name: str) -> str:
    """How a user sets ``name``: the serve option and/or the environment variable."""
    env = PREFIX + name.upper()
    return f"{CLI_OPTIONS[name]} ({env})" if name in CLI_OPTIONS else env


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

    def __post_init__(self) -> None:
        """Bad values fail here, before uvicorn starts, and not as a traceback in each worker (or, for a
        misspelt backend, not at all: load_predictor would quietly run PyTorch)."""
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{_option(name)} must be a whole number >= 1, got {value}")
        if not self.timeout_s > 0:  # also refuses NaN
            raise ValueError(f"{_option('timeout_s')} must be a number of seconds > 0, got {self.timeout_s:g}")
        if self.backend not in BACKENDS:
            raise ValueError(f"{_option('backend')} must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def to_env(self) -> dict[str, str]:
        """Everything but tokens (those stay in LESIONLAB_API_TOKENS / _FILE, never in our own variables)."""
        env = {MODEL_ENV: self.model_dir} if self.model_dir else {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("model_dir", "tokens") and value is not None:
                env[PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServeSettings:
        from lesionlab.serve.middleware import read_tokens

        kwargs: dict = {"model_dir": env.get(MODEL_ENV) or None, "tokens": read_tokens(dict(env))}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or f.name in ("model_dir", "tokens"):
                continue
            kind = {
                "max_body_bytes": int,
                "max_concurrency": int,
                "timeout_s": float,
                "num_threads": int,
                "inference_threads": int,
                "max_pixels": int,
                "max_batch": int,
                "load_before_accepting": _flag,
            }.get(f.name, str)
            try:
                kwargs[f.name] = kind(raw)
            except ValueError:
                what = "true/false" if kind is _flag else kind.__name__
                raise ValueError(f"{PREFIX + f.name.upper()}={raw!r} is not a valid {what}") from None
        return cls(**kwargs)
