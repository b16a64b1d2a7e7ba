"""Where a cross-fit ensemble's out-of-fold operating threshold lands on test, and why (docs/results.md 3.3).

    python bench/threshold_transfer.py runs/xfit [runs/other-xfit ...]

The threshold of a cross-fit ensemble is fitted on out-of-fold scores, each made by one fold's members; a test
image is scored by all folds' members together. For each ensemble this prints, at its own out-of-fold
threshold, the test sensitivity / specificity of each fold's sub-ensemble (scored exactly like an out-of-fold
image) and of the whole ensemble, and, as a ceiling only, the specificity at test sensitivity 0.95 and 0.96
with the threshold set on the test labels. It reads the members' predictions.csv, as each member was
evaluated (with or without --tta), and chooses nothing: it uses test labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab import runs as rf
from lesionlab.ensemble.members import fold_groups, member_dirs
from lesionlab.ensemble.scores import combine, member_scores, out_of_fold
from lesionlab.evaluation.metrics import choose_threshold
from lesionlab.runs import RunFolder


def sens_spec(y: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = prob >= threshold
    return float(pred[y == 1].mean()), float((~pred[y == 0]).mean())


def row(folder: Path) -> str:
    if not RunFolder(folder).is_ensemble:
        raise SystemExit(f"{folder} is not an ensemble folder (no {rf.ENSEMBLE})")
    members = member_dirs(folder)
    groups = fold_groups(members)
    if len(groups) < 2:
        raise SystemExit(f"{folder} is not a cross-fit ensemble (its members share one split)")
    ops = [RunFolder(m).require_operating_point() for m in members]  # each member as it was evaluated (TTA or not)
    scores = [member_scores(m, None, op.tta, reuse=True, progress=False) for m, op in zip(members, ops)]
    temps = [op.temperature for op in ops]
    oof = out_of_fold(scores, temps, groups)
    # Scores are the mean calibrated probability of the members, without the ensemble's own temperature: that
    # is monotone, so it moves the threshold's value but not which images fall on either side of it.
    t = choose_threshold(oof.y, expit(oof.logits), "sensitivity:0.95")
    test = combine(scores, temps, ["test"])["test"]
    p_test = expit(test.logits)
    subs = [combine([scores[i] for i in g], [temps[i] for i in g], ["test"])["test"] for g in groups]
    per_fold = np.array([sens_spec(s.y, expit(s.logits), t) for s in subs])
    sens, spec = sens_spec(test.y, p_test, t)
    ceiling = []
    for target in (0.95, 0.96):
        t_test = choose_threshold(test.y, p_test, f"sensitivity:{target}")
        ceiling.append(f"{sens_spec(test.y, p_test, t_test)[1]:.3f}")
    return (
        f"| {folder.name} | {per_fold[:, 0].mean():.3f} / {per_fold[:, 1].mean():.3f} "
        f"({per_fold[:, 0].min():.3f}-{per_fold[:, 0].max():.3f}) | {sens:.3f} / {spec:.3f} | "
        f"{' / '.join(ceiling)} |"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(
        "| cross-fit ensemble | test sensitivity / specificity of the fold sub-ensembles (mean; sensitivity range) "
        "| test sensitivity / specificity of the ensemble | specificity at test sensitivity 0.95 / 0.96, "
        "threshold set on test (a ceiling) |"
    )
    print("|---|---|---|---|")
    for a in sys.argv[1:]:
        print(row(Path(a)))
