"""Diagnosis metrics of a model with a diagnosis head (``--target diagnosis``), beside the binary ones.

Balanced multi-class accuracy, the ISIC 2018 Task 3 metric: the mean over the diagnoses present of their recall,
so a rare class counts as much as nevi. It comes with each diagnosis's recall, the confusion matrix and 95%
percentile CIs from a bootstrap stratified by diagnosis (each resample keeps every diagnosis's count). Only images
whose diagnosis is one of the head's classes count; the others (no diagnosis, or one the model never learnt) are
counted apart.

The probabilities are the calibrated ones the predictor serves (the malignant group scaled to the calibrated
P(malignant)), so the numbers describe what a user sees.

The decision, the predicted diagnosis, is one of two rules, chosen on validation's balanced accuracy like the
threshold: ``argmax``, the most probable diagnosis, or ``prior_corrected``, the most probable after dividing each
probability by its diagnosis's share of the training images (logit adjustment, Menon et al., ICLR 2021: the Bayes
decision for balanced accuracy when the probabilities are right). Nothing is fitted: the priors are counts. Trained
on HAM10000, two thirds of whose lesions are nevi, the argmax says "nv" for most uncertain lesions; the corrected rule
trades some nevus recall for the rare classes'. P(malignant), the threshold and the served probabilities are the
same under either rule.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

from lesionlab.evaluation.report import cell
from lesionlab.inference.diagnoses import regroup

METRIC = "balanced multi-class accuracy (ISIC 2018 Task 3): mean over the diagnoses present of their recall"
SECTION = "## Diagnoses"
ARGMAX, PRIOR_CORRECTED = "argmax", "prior_corrected"
RULES = {
    ARGMAX: "the most probable diagnosis",
    PRIOR_CORRECTED: "the most probable diagnosis after dividing each probability by its share of the training images",
}


def training_priors(diagnoses: Sequence[str | None], names: Sequence[str]) -> dict[str, float] | None:
    """Each head class's share of the training images whose diagnosis is one of ``names``; None when none is (a
    class the training split never saw gets its share 0 and is then never chosen by the corrected rule)."""
    head = set(names)
    counts = Counter(d for d in diagnoses if d in head)
    total = sum(counts.values())
    return {n: counts[n] / total for n in names} if total else None


def decide(probs: np.ndarray, names: Sequence[str], decision: Mapping[str, Any] | None = None) -> np.ndarray:
    """The predicted class index per row of ``probs`` under ``decision`` (``{"rule", "priors"}``; None: argmax)."""
    probs = np.asarray(probs, np.float64)
    if decision is None or decision.get("rule", ARGMAX) == ARGMAX:
        return probs.argmax(axis=1)
    if decision["rule"] != PRIOR_CORRECTED:
        raise ValueError(f"unknown diagnosis decision {decision['rule']!r}: one of {', '.join(RULES)}")
    prior = np.array([decision["priors"][n] for n in names], np.float64)
    # a class never trained on (share 0) is never chosen; the division is by 1 there, then masked
    adjusted = np.where(prior > 0, probs / np.where(prior > 0, prior, 1.0), -np.inf)
    return adjusted.argmax(axis=1)


def choose_decision(
    true: Sequence[str | None], probs: np.ndarray, names: Sequence[str], priors: Mapping[str, float] | None
) -> dict[str, Any]:
    """The rule with the higher balanced accuracy on this (validation) set, argmax on a tie or without priors or
    diagnoses: ``{"rule", "priors", "chosen_on", "description", "val_balanced_accuracy": {rule: value}}``."""
    scores: dict[str, float] = {}
    for rule in RULES if priors else ():
        block = diagnosis_metrics(true, probs, names, n_resamples=0, decision={"rule": rule, "priors": priors})
        if block is not None:  # None: no image of this set has one of the head's diagnoses
            scores[rule] = block["balanced_accuracy"]["value"]
    rule = PRIOR_CORRECTED if scores and scores[PRIOR_CORRECTED] > scores[ARGMAX] else ARGMAX
    return {
        "rule": rule,
        "description": RULES[rule],
        "priors": dict(priors) if priors else None,
        "chosen_on": "val",
        "val_balanced_accuracy": scores,
    }


def _ci(draws: list[float]) -> list[float]:
    return [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))] if draws else [np.nan] * 2


def diagnosis_metrics(
    true: Sequence[str | None],
    probs: np.ndarray,
    names: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    decision: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The ``diagnosis`` block of one scored set, the prediction made by ``decision`` (``{"rule", "priors"}``,
    :func:`choose_decision`; None: argmax): ``balanced_accuracy`` and per class ``recall`` as ``{"value",
    "ci95"}``, ``per_class`` counts, ``confusion`` (rows: true, columns: predicted, in ``classes`` order), ``n``
    (images counted), ``n_without_diagnosis``, ``n_other_diagnoses`` and ``decision`` (the rule's name). None when
    no image has a diagnosis among ``names`` (a set of benign/malignant folders)."""
    from sklearn.metrics import balanced_accuracy_score

    names = list(names)
    index = {n: i for i, n in enumerate(names)}
    keep = np.array([d in index for d in true], bool)
    if not keep.any():
        return None
    y = np.array([index[d] for d in true if d in index])
    pred = decide(np.asarray(probs)[keep], names, decision)
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
        "decision": (decision or {}).get("rule", ARGMAX),
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
    priors: Mapping[str, float] | None = None,
) -> None:
    """Chooses the decision on validation (``metrics["diagnosis_decision"]``, :func:`choose_decision`; argmax
    without ``priors``) and adds ``metrics[split]["diagnosis"]`` under it for each split of ``scores``
    (``SplitScores``) that has diagnosis probabilities and images with a diagnosis, calibrated to ``probs`` (the
    split's calibrated P(malignant))."""
    mask = np.array([n in malignant for n in names], bool)
    calibrated = {
        split: regroup(s.diagnosis_probs, mask, probs[split])
        for split, s in scores.items()
        if s.diagnosis_probs is not None and s.true_diagnoses is not None and split in metrics
    }
    val_truth = scores["val"].true_diagnoses or [] if "val" in calibrated else []
    decision = choose_decision(val_truth, calibrated.get("val", np.zeros((0, len(names)))), names, priors)
    metrics["diagnosis_decision"] = decision
    for split, p in calibrated.items():
        block = diagnosis_metrics(scores[split].true_diagnoses or [], p, names, n_resamples, seed, decision)
        if block is not None:
            metrics[split]["diagnosis"] = block


def block_lines(block: Mapping[str, Any], malignant: Sequence[str] = ()) -> list[str]:
    """Markdown lines of one ``diagnosis`` block: balanced accuracy, then recall per diagnosis."""
    lines = [
        f"Balanced multi-class accuracy (ISIC 2018 Task 3 metric): **{cell(block['balanced_accuracy'])}** over "
        f"{block['n']} images with a diagnosis among the model's {len(block['classes'])} "
        f"({block['n_without_diagnosis']} without a diagnosis, {block['n_other_diagnoses']} with another one, not "
        f"counted); the prediction is {RULES[block.get('decision', ARGMAX)]} (`{block.get('decision', ARGMAX)}`).",
        "",
        "| diagnosis | class | n | predicted | recall [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name, row in block["per_class"].items():
        kind = "malignant" if name in malignant else "benign" if malignant else ""
        lines.append(f"| {name} | {kind} | {row['n']} | {row['n_predicted']} | {cell(row['recall'])} |")
    return [*lines, ""]


def decision_lines(decision: Mapping[str, Any] | None) -> list[str]:
    """How the predicted diagnosis was chosen (``metrics["diagnosis_decision"]``); [] for a run evaluated before
    the choice existed (its blocks are argmax)."""
    if not decision:
        return []
    scores = decision.get("val_balanced_accuracy") or {}
    tried = ", ".join(f"`{r}` {v:.3f}" for r, v in scores.items())
    priors = decision.get("priors") or {}
    return [
        f"Decision: `{decision['rule']}`, {RULES[decision['rule']]}, chosen on validation's balanced accuracy"
        + (f" ({tried})." if tried else " (no validation image has a diagnosis: argmax)."),
        *(
            ["Training priors: " + ", ".join(f"{n} {q:.3f}" for n, q in priors.items()) + "."]
            if decision["rule"] == PRIOR_CORRECTED
            else []
        ),
        "",
    ]


def diagnosis_report(metrics: Mapping[str, Any], malignant: Sequence[str] = ()) -> str:
    """report.md's ``## Diagnoses`` section: every split of ``metrics`` with a ``diagnosis`` block; "" if none."""
    splits = [k for k, v in metrics.items() if isinstance(v, Mapping) and "diagnosis" in v]
    if not splits:
        return ""
    lines = [
        SECTION,
        "",
        "The diagnosis head's predicted diagnosis against the true one (calibrated probabilities, as served); "
        "95% CIs from a bootstrap stratified by diagnosis.",
        "",
        *decision_lines(metrics.get("diagnosis_decision")),
    ]
    for split in splits:
        lines += [f"### {split}", "", *block_lines(metrics[split]["diagnosis"], malignant)]
    return "\n".join(lines)
