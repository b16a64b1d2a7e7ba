"""A cross-fit ensemble's operating point fitted on a nested out-of-fold estimate of the ensemble itself.

    python bench/nested_threshold.py runs/xfit --inner runs/nest-f01 runs/nest-f02 ...

A cross-fit ensemble fits its temperature and threshold on out-of-fold scores, each made by ONE fold's members,
while a test image gets the mean of ALL folds' members (docs/results.md 3.3). The inner runs (`lesionlab train
--fold K --also-val-fold L`, one per pair of folds, the ensemble's recipe) fix the mismatch: a training image of
fold K is scored by the mean of every inner run that held K out (four of them for five folds), an average of
models none of which saw it, like a test image. This prints, for the out-of-fold and the nested estimate: the
`sensitivity:0.95` threshold's test sensitivity / specificity, and the temperature's test ECE (15 bins).
It uses test labels to report, and changes nothing in the folders.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab.ensemble.members import fold_groups, member_dirs
from lesionlab.ensemble.scores import combine, member_scores, nested_out_of_fold, out_of_fold
from lesionlab.evaluation.metrics import (
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    point_metrics,
)
from lesionlab.evaluation.scoring import SplitScores
from lesionlab.runs import RunFolder

POLICY = "sensitivity:0.95"


def _scored(run: Path) -> tuple[dict, float, bool]:
    """A run's scores (its predictions.csv when current), its temperature and whether it was scored with TTA."""
    op = RunFolder(run).require_operating_point()
    return member_scores(run, None, op.tta, reuse=True, progress=False), op.temperature, op.tta


def nested(inner: list[Path]) -> tuple[SplitScores, np.ndarray]:
    """The nested estimate (lesionlab.ensemble.nested_out_of_fold) and how many inner runs scored each image."""
    return _nested([_scored(r) for r in inner])


def _nested(scored: list[tuple[dict, float, bool]]) -> tuple[SplitScores, np.ndarray]:
    est = nested_out_of_fold([s[0] for s in scored], [s[1] for s in scored])
    seen = Counter(r for s in scored for r in s[0]["val"].relpaths)
    return est, np.array([seen[r] for r in est.relpaths])


def compare(ensemble: Path, inner: list[Path]) -> str:
    members = member_dirs(ensemble)
    groups = fold_groups(members)
    if len(groups) < 2:
        raise SystemExit(f"{ensemble} is not a cross-fit ensemble")
    scored, scored_inner = [_scored(m) for m in members], [_scored(r) for r in inner]  # each read once
    if len({s[2] for s in scored + scored_inner}) > 1:
        raise SystemExit("members and inner runs must all be evaluated with the same --tta setting")
    per_member, temps = [s[0] for s in scored], [s[1] for s in scored]
    oof = out_of_fold(per_member, temps, groups)
    test = combine(per_member, temps, ["test"])["test"]
    nest, counts = _nested(scored_inner)
    if set(nest.relpaths) != set(oof.relpaths):
        missing = len(set(oof.relpaths) - set(nest.relpaths))
        raise SystemExit(f"the inner runs leave {missing} training images unscored; give one run per pair of folds")
    rows = [
        "| estimate | n runs per image | AUC there | threshold's test sensitivity / specificity | "
        "temperature | test ECE after |",
        "|---|---|---|---|---|---|",
    ]
    for name, est, n in (
        ("out of fold (one fold's members)", oof, "1"),
        ("nested (inner runs that held the fold out)", nest, f"{counts.min()}-{counts.max()}"),
    ):
        threshold = choose_threshold(est.y, expit(est.logits), POLICY)
        m = point_metrics(test.y, expit(test.logits), threshold)
        temperature = fit_temperature(est.y, est.logits)
        ece = expected_calibration_error(test.y, expit(test.logits / temperature))
        auc = point_metrics(est.y, expit(est.logits))["auc"]
        rows.append(
            f"| {name} | {n} | {auc:.4f} | {m['recall']:.3f} / {m['specificity']:.3f} | {temperature:.3f} | {ece:.3f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ensemble", type=Path, help="a cross-fit ensemble folder")
    ap.add_argument("--inner", type=Path, nargs="+", required=True, help="the inner runs (--also-val-fold)")
    args = ap.parse_args()
    print(compare(args.ensemble, args.inner))
