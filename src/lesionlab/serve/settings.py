"""Service settings, and their round trip through environment variables.

``lesionlab serve --workers N`` starts N uvicorn worker processes that each build the app from the
environment (uvicorn can only hand workers an import string), so every knob has a variable.

Deprecated: ``LESIONLAB_SERVE_BACKEND`` is still read where ``LESIONLAB_SERVE_RUNTIME`` is not set (with a
FutureWarning), and ``settings.backend`` still reads ``settings.runtime``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lesionlab.data.images import DEFAULT_MAX_PIXELS
from lesionlab.errors import LesionlabError
from lesionlab.inference.loading import BACKENDS

PREFIX = "LESIONLAB_SERVE_"
MODEL_ENV = "LESIONLAB_MODEL"
#: ``lesionlab serve`` option of each setting that has one, for error messages
CLI_OPTIONS = {
    "max_body_bytes": "--max-body-bytes",
    "max_concurrency": "--max-concurrency",
    "timeout_s": "--timeout",
    "runtime": "--runtime",
    "num_threads": "--threads",
    "inference_threads": "--inference-threads",
}
#: environment variables renamed, new -> old: the old one is still read where the new one is not set
DEPRECATED_ENV = {PREFIX + "RUNTIME": PREFIX + "BACKEND"}
POSITIVE = ("max_body_bytes", "max_concurrency", "num_threads", "inference_threads", "max_pixels", "max_batch")


class SettingsError(LesionlabError):
    """A serve setting (option or environment variable) out of range or not one of its choices."""


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


#: how from_env reads each variable that is not a plain string
_PARSERS: dict[str, Callable[[str], Any]] = {
    "max_body_bytes": int,
    "max_concurrency": int,
    "timeout_s": float,
    "num_threads": int,
    "inference_threads": int,
    "max_pixels": int,
    "max_batch": int,
    "load_before_accepting": _flag,
}


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
    runtime: str = "auto"  # auto | onnx | torch: which engine runs the model (BACKENDS)
    num_threads: int | None = None  # ONNX Runtime / torch intra-op threads; None = runtime default
    inference_threads: int = 2  # requests decoded and inferred at once per worker
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 32
    # load the model before the worker takes connections; on with several workers, where a probe answered by
    # one ready worker says nothing about the others sharing the socket
    load_before_accepting: bool = False
    tokens: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        """Bad values raise SettingsError here, naming the option and variable: before uvicorn starts, and not
        as a traceback in each worker (or, for a misspelt runtime, not at all: load_predictor would quietly
        run PyTorch)."""
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"{_option(name)} must be a whole number >= 1, got {value}")
        if not self.timeout_s > 0:  # also refuses NaN
            raise SettingsError(f"{_option('timeout_s')} must be a number of seconds > 0, got {self.timeout_s:g}")
        if self.runtime not in BACKENDS:
            raise SettingsError(f"{_option('runtime')} must be one of {', '.join(BACKENDS)}, got {self.runtime!r}")

    @property
    def backend(self) -> str:
        """Deprecated name of ``runtime``, for callers that still read ``settings.backend``."""
        return self.runtime

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
        """Settings from ``LESIONLAB_SERVE_*`` (and the token variables); a malformed value raises SettingsError."""
        from lesionlab.serve.middleware import read_tokens

        kwargs: dict = {"model_dir": env.get(MODEL_ENV) or None, "tokens": read_tokens(dict(env))}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            old = DEPRECATED_ENV.get(PREFIX + f.name.upper())
            if raw is None and old is not None and old in env:
                # FutureWarning, not DeprecationWarning: it is meant for whoever sets the variable, and Python
                # hides DeprecationWarning outside __main__
                warnings.warn(f"{old} is deprecated; set {PREFIX + f.name.upper()}", FutureWarning, stacklevel=2)
                raw = env[old]
            if raw is None or f.name in ("model_dir", "tokens"):
                continue
            kind = _PARSERS.get(f.name, str)
            try:
                kwargs[f.name] = kind(raw)
            except ValueError:
                what = "true/false" if kind is _flag else getattr(kind, "__name__", "value")
                raise SettingsError(f"{PREFIX + f.name.upper()}={raw!r} is not a valid {what}") from None
        return cls(**kwargs)
