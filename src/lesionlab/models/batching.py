"""One batching loop for every network call: predictor, ONNX export checks, feature extraction, training logits.

A model sees at most ``batch_size`` images at a time (memory, and CPU caches: batches of 16-32 run faster
per image than larger ones here); the callers only say what one batch computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

Out = TypeVar("Out")


def map_batches(
    fn: Callable[[np.ndarray], Out],
    x: np.ndarray,
    batch_size: int,
    *,
    empty: Out | None = None,
    progress: Callable[[range], Iterable[int]] | None = None,
) -> Out:
    """``fn`` over consecutive slices ``x[i : i + batch_size]``, its outputs concatenated along axis 0.

    ``fn`` returns an array, or a tuple of arrays and ``None`` entries (an output the model does not have,
    e.g. features from an ONNX graph without them): each position is concatenated separately and a ``None``
    stays ``None``. Dtypes are ``fn``'s own. A single batch is returned as ``fn`` gave it (no copy).

    Empty ``x``: returns ``empty`` when given (``fn`` is not called: some runtimes reject a batch of 0);
    otherwise ``fn(x[:0])``, once, so the result has ``fn``'s own shapes, e.g. ``(0, D)`` features.

    ``progress`` wraps the iterable of batch start offsets, e.g. ``functools.partial(tqdm, desc="features",
    unit="batch")``. Raises ValueError when ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(x) == 0:
        return fn(x[:0]) if empty is None else empty
    starts = range(0, len(x), batch_size)
    outs = [fn(x[i : i + batch_size]) for i in (progress(starts) if progress else starts)]
    if len(outs) == 1:
        return outs[0]
    return _concatenate(outs)


def _concatenate(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, tuple):
        return tuple(_concatenate([o[k] for o in outs]) for k in range(len(first)))
    if first is None:
        if any(o is not None for o in outs):
            raise ValueError("fn returned None for some batches and an array for others")
        return None
    return np.concatenate(outs)
