"""Diagnosis probabilities of a model with a diagnosis head (``--target diagnosis``).

The head's binary logit is logsumexp(malignant logits) - logsumexp(benign logits), so the softmax over its K
diagnosis logits sums over the malignant ones to sigmoid(logit). Temperature scaling and TTA act on that logit,
so the probabilities a predictor reports keep each group's shares of the softmax and rescale the malignant group to
the calibrated P(malignant) and the benign one to 1 - P (:func:`regroup`): the malignant diagnoses always add up to
the probability served. At temperature 1 without TTA that is the softmax itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import softmax

from lesionlab import runs as rf

_TINY = 1e-300  # a group's sum when every one of its probabilities underflowed


def regroup(probs: np.ndarray, malignant: np.ndarray, p_malignant: np.ndarray) -> np.ndarray:
    """``probs`` (N, K; rows sum to 1) with the columns where ``malignant`` (K bools) rescaled to sum to
    ``p_malignant`` (N,) and the others to 1 - ``p_malignant``, each group's shares kept."""
    probs = np.asarray(probs, np.float64)
    p = np.asarray(p_malignant, np.float64)[:, None]
    mal = probs * malignant
    ben = probs * ~malignant
    return mal / np.maximum(mal.sum(1, keepdims=True), _TINY) * p + ben / np.maximum(
        ben.sum(1, keepdims=True), _TINY
    ) * (1 - p)


def diagnosis_probabilities(z: np.ndarray, malignant: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """(N, K) probabilities of diagnosis logits ``z`` (a view's, or the mean over TTA views), grouped so that the
    malignant diagnoses sum to sigmoid(``logits``), the (uncalibrated) binary logits scored with them."""
    from scipy.special import expit

    return regroup(softmax(np.asarray(z, np.float64), axis=1), malignant, expit(np.asarray(logits, np.float64)))


def model_diagnoses(model_dir: str | Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the diagnosis head's classes in output order, the malignant ones) of a model folder, from config.json's
    ``model`` block, else preprocess.json (an exported model alone); ((), ()) for a binary model."""
    folder = rf.RunFolder(model_dir)
    if folder.has(rf.CONFIG):
        block = folder.config.raw.get("model", {})
    elif folder.has(rf.PREPROCESS):
        block = folder.read_json(rf.PREPROCESS)
    else:
        block = {}
    names = tuple(block.get("diagnoses") or ())
    return names, tuple(block.get("malignant_diagnoses") or ()) if names else ()
