"""Scores of an ensemble: each member's logits per split, and how they are combined into the ensemble's.

A member's calibrated probability is expit(logit / T) with its own temperature T; the ensemble's logit is the
logit of the mean of its members' calibrated probabilities (:data:`COMBINE`), on which the ensemble fits its
own temperature and threshold. Validation is scored by every member (shared layout), out of fold (cross-fit)
or by the inner runs (nested); test always by every member.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab import runs as rf
from lesionlab.ensemble.members import pool_rows
from lesionlab.evaluation.scoring import EVAL_SPLITS, SplitScores, score_run
from lesionlab.inference.ensemble import mean_probability_logit
from lesionlab.runs import RunFolder

COMBINE = "mean of the members' calibrated probabilities"
#: metrics.json's ``threshold.chosen_on`` of a cross-fit ensemble, without and with inner runs.
OUT_OF_FOLD_NOTE = "val (out of fold: every training image, scored by the members that held it out)"
NESTED_NOTE = (
    "val (nested out of fold: every training image, scored by the mean of the inner runs that held its fold out)"
)

# predictions.csv may not round-trip a probability exactly: above this gap it came from another calibration.
_STALE_PROBABILITY = 1e-4


def scores_from_predictions(run_dir: Path, tta: bool = False) -> dict[str, SplitScores] | None:
    """A member's logits from its predictions.csv, or None when the file is missing or does not match the
    member's current calibration, TTA setting or validation split (then it must be scored again)."""
    run = RunFolder(run_dir)
    op = run.operating_point()
    if not run.has(rf.PREDICTIONS) or op is None or op.tta != tta:
        return None
    # RunFolder has no reader for predictions.csv (evaluation writes it); its columns are read here.
    rows: dict[str, list[tuple[str, float, float, float]]] = {s: [] for s in EVAL_SPLITS}
    with open(run / rf.PREDICTIONS, newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] in rows:
                rows[r["split"]].append((r["relpath"], float(r["label"]), float(r["logit"]), float(r["probability"])))
    if any(not v for v in rows.values()):
        return None
    out = {}
    for split, items in rows.items():
        z = np.array([i[2] for i in items])
        if np.max(np.abs(expit(z / op.temperature) - np.array([i[3] for i in items]))) > _STALE_PROBABILITY:
            return None  # probabilities from another calibration: the file is stale
        out[split] = SplitScores([i[0] for i in items], np.array([i[1] for i in items], np.float32), z)
    val_rel = {r[0] for r in pool_rows(run_dir) if r[2] == "val"}
    return out if set(out["val"].relpaths) <= val_rel else None


def member_scores(
    run_dir: Path, data: str | Path | None, tta: bool, reuse: bool, progress: bool
) -> dict[str, SplitScores]:
    """Uncalibrated logits per split; from predictions.csv when ``reuse`` and it is consistent."""
    if reuse and data is None:
        found = scores_from_predictions(run_dir, tta)
        if found is not None:
            return found
    return score_run(run_dir, data, tta, progress)


def combine(
    per_member: Sequence[dict[str, SplitScores]], temperatures: Sequence[float], splits: Sequence[str] = EVAL_SPLITS
) -> dict[str, SplitScores]:
    """Per split, on the images every member scored: logit of the mean calibrated probability."""
    out = {}
    for split in splits:
        maps = [dict(zip(s[split].relpaths, zip(s[split].y, s[split].logits))) for s in per_member]
        common = [r for r in per_member[0][split].relpaths if all(r in m for m in maps[1:])]
        if not common:
            raise rf.RunError(f"the members have no {split} image in common")
        y = np.array([maps[0][r][0] for r in common], np.float32)
        for m in maps[1:]:
            if any(m[r][0] != maps[0][r][0] for r in common):
                raise rf.RunError(
                    f"members disagree on the labels of {split} images; were they trained on the same "
                    "data folder and classes?"
                )
        probs = [expit(np.array([m[r][1] for r in common]) / t) for m, t in zip(maps, temperatures)]
        out[split] = SplitScores(common, y, mean_probability_logit(probs))
    return out


def out_of_fold(
    per_member: Sequence[dict[str, SplitScores]], temperatures: Sequence[float], groups: Sequence[Sequence[int]]
) -> SplitScores:
    """Cross-fit validation: each fold scored by the members that held it out (mean calibrated probability),
    sorted by relpath."""
    parts = [combine([per_member[i] for i in g], [temperatures[i] for i in g], ["val"])["val"] for g in groups]
    relpaths = [r for p in parts for r in p.relpaths]
    order = np.argsort(relpaths, kind="stable")
    return SplitScores(
        [relpaths[i] for i in order],
        np.concatenate([p.y for p in parts])[order],
        np.concatenate([p.logits for p in parts])[order],
    )


def nested_out_of_fold(per_inner: Sequence[dict[str, SplitScores]], temperatures: Sequence[float]) -> SplitScores:
    """Every inner run's validation images, each scored by the mean calibrated probability of all the inner
    runs that held it out; sorted by relpath."""
    probs: dict[str, list[float]] = {}
    labels: dict[str, float] = {}
    for scores, t in zip(per_inner, temperatures):
        val = scores["val"]
        for r, y, z in zip(val.relpaths, val.y, val.logits):
            probs.setdefault(r, []).append(float(expit(z / t)))
            if labels.setdefault(r, float(y)) != float(y):
                raise rf.RunError(f"inner runs disagree on the label of {r}; were they trained on the same data?")
    rel = sorted(probs)
    mean = np.array([np.mean(probs[r]) for r in rel])
    return SplitScores(rel, np.array([labels[r] for r in rel], np.float32), mean_probability_logit([mean]))


def ensemble_scores(
    per_member: Sequence[dict[str, SplitScores]],
    temperatures: Sequence[float],
    groups: Sequence[Sequence[int]],
    nested: SplitScores | None = None,
) -> dict[str, SplitScores]:
    """Validation (shared, out of fold, or the nested estimate when given) and test scores of the ensemble.
    RunError when the nested estimate does not cover exactly the members' validation folds."""
    if len(groups) == 1:
        return combine(per_member, temperatures)
    scores = combine(per_member, temperatures, [s for s in EVAL_SPLITS if s != "val"])
    val = out_of_fold(per_member, temperatures, groups)
    if nested is not None:
        if set(nested.relpaths) != set(val.relpaths):
            gap = len(set(val.relpaths) ^ set(nested.relpaths))
            raise rf.RunError(
                f"the inner runs' validation images differ from the members' folds ({gap} images); "
                "give one inner run per pair of the members' folds (`train --fold K "
                "--also-val-fold L`, same --split-seed and data)"
            )
        val = nested
    return {"val": val, **scores}
