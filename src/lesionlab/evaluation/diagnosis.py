"""Diagnosis metrics of a model with a diagnosis head (``--target diagnosis``), beside the binary ones.

Balanced multi-class accuracy, the ISIC 2018 Task 3 metric: the predicted diagnosis is the most probable one, and
the score is the mean over the diagnoses present of their recall, so a rare class counts as much as nevi. It comes
with each diagnosis's recall, the confusion matrix and 95% percentile CIs from a bootstrap stratified by diagnosis
(each resample keeps every diagnosis's count). Only images whose diagnosis is one of the head's classes count; the
others (no diagnosis, or one the model never learnt) are counted apart.

The probabilities are the calibrated ones the predictor serves (the malignant group scaled to the calibrated
P(malignant)), so the numbers describe what a user sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

from lesionlab.inference.diagnoses import regroup

METRIC = (
    "balanced multi-class accuracy (ISIC 2018 Task 3): mean over the diagnoses present of their recall, the "
    "prediction being the most probable diagnosis"
)
SECTION = "## Diagnoses"


def _ci(draws: list[float]) -> list[float]:
    return [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))] if draws else [np.nan] * 2


def diagnosis_metrics(
    true: Sequence[str | None], probs: np.ndarray, names: Sequence[str], n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """The ``diagnosis`` block of one scored set: ``balanced_accuracy`` and per class ``recall`` as
    ``{"value", "ci95"}``, ``per_class`` counts, ``confusion`` (rows: true, columns: predicted, in ``classes``
    order), ``n`` (images counted), ``n_without_diagnosis`` and ``n_other_diagnoses``. None when no image has a
    diagnosis among ``names`` (a set of benign/malignant folders)."""
    from sklearn.metrics import balanced_accuracy_score

    names = list(names)
    index = {n: i for i, n in enumerate(names)}
    keep = np.array([d in index for d in true], bool)
    if not keep.any():
        return None
    y = np.array([index[d] for d in true if d in index])
    pred = np.asarray(probs)[keep].argmax(axis=1)
    with warnings.catch_warnings():  # a class predicted but absent from the truth: sklearn warns, and skips it
        warnings.simplefilter("ignore")
        value = float(balanced_accuracy_score(y, pred))
    members = {k: np.flatnonzero(y == k) for k in range(len(names)) if (y == k).any()}
    rng = np.random.default_rng(seed)
    draws: dict[int, list[float]] = {k: [] for k in members}
    balanced: list[float] = []
    for _ in range(n_resamples):
        recalls = [float(np.mean(pred[rng.choice(idx, len(idx))] == k)) for k, idx in members.items()]
        for k, r in zip(members, recalls):
            draws[k].append(r)
        balanced.append(float(np.mean(recalls)))
    per_class: dict[str, Any] = {}
    for k, name in enumerate(names):
        n = int((y == k).sum())
        recall = {"value": float(np.mean(pred[y == k] == k)), "ci95": _ci(draws[k])} if n else None
        per_class[name] = {"n": n, "n_predicted": int((pred == k).sum()), "recall": recall}
    confusion = np.zeros((len(names), len(names)), int)
    np.add.at(confusion, (y, pred), 1)
    return {
        "metric": METRIC,
        "classes": names,
        "n": int(keep.sum()),
        "n_without_diagnosis": sum(d is None for d in true),
        "n_other_diagnoses": sum(d is not None and d not in index for d in true),
        "balanced_accuracy": {"value": value, "ci95": _ci(balanced)},
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "n_resamples": int(n_resamples),
    }


def add_diagnosis_metrics(
    metrics: MutableMapping[str, Any],
    scores: Mapping[str, Any],
    probs: Mapping[str, np.ndarray],
    names: Sequence[str],
    malignant: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
) -> None:
    """Adds ``metrics[split]["diagnosis"]`` for each split of ``scores`` (``SplitScores``) that has diagnosis
    probabilities and images with a diagnosis, calibrated to ``probs`` (the split's calibrated P(malignant))."""
    mask = np.array([n in malignant for n in names], bool)
    for split, s in scores.items():
        if s.diagnosis_probs is None or s.true_diagnoses is None or split not in metrics:
            continue
        block = diagnosis_metrics(
            s.true_diagnoses, regroup(s.diagnosis_probs, mask, probs[split]), names, n_resamples, seed
        )
        if block is not None:
            metrics[split]["diagnosis"] = block


def _fmt(r: Mapping[str, Any] | None) -> str:
    if r is None or r.get("value") is None or np.isnan(r["value"]):
        return "n/a"
    lo, hi = r["ci95"]
    return f"{r['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def block_lines(block: Mapping[str, Any], malignant: Sequence[str] = ()) -> list[str]:
    """Markdown lines of one ``diagnosis`` block: balanced accuracy, then recall per diagnosis."""
    lines = [
        f"Balanced multi-class accuracy (ISIC 2018 Task 3 metric): **{_fmt(block['balanced_accuracy'])}** over "
        f"{block['n']} images with a diagnosis among the model's {len(block['classes'])} "
        f"({block['n_without_diagnosis']} without a diagnosis, {block['n_other_diagnoses']} with another one, not "
        "counted).",
        "",
        "| diagnosis | class | n | predicted | recall [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name, row in block["per_class"].items():
        kind = "malignant" if name in malignant else "benign" if malignant else ""
        lines.append(f"| {name} | {kind} | {row['n']} | {row['n_predicted']} | {_fmt(row['recall'])} |")
    return [*lines, ""]


def diagnosis_report(metrics: Mapping[str, Any], malignant: Sequence[str] = ()) -> str:
    """report.md's ``## Diagnoses`` section: every split of ``metrics`` with a ``diagnosis`` block; "" if none."""
    splits = [k for k, v in metrics.items() if isinstance(v, Mapping) and "diagnosis" in v]
    if not splits:
        return ""
    lines = [
        SECTION,
        "",
        "The diagnosis head's most probable diagnosis against the true one (calibrated probabilities, as served); "
        "95% CIs from a bootstrap stratified by diagnosis.",
        "",
    ]
    for split in splits:
        lines += [f"### {split}", "", *block_lines(metrics[split]["diagnosis"], malignant)]
    return "\n".join(lines)
