"""Issue 5's acceptance targets for evaluated model folders (runs or ensembles), read from metrics.json.

    python bench/targets.py runs/xfit [runs/other ...]

Prints one markdown table per folder: target, measured value (with the 95% CI where there is one) and met /
not met. Nothing is recomputed; CPU training time is the sum of the members' recorded epoch times.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lesionlab import runs as rf
from lesionlab.ensemble.members import member_dirs
from lesionlab.evaluation.report import fmt
from lesionlab.runs import RunFolder


def training_minutes(folder: Path) -> float:
    total = 0.0
    runs = member_dirs(folder) + member_dirs(folder, "inner") if RunFolder(folder).is_ensemble else [folder]
    for m in runs:  # an ensemble's inner runs (nested calibration) are part of its training
        timing = RunFolder(m).config.raw.get("timing", {})
        total += float(timing.get("epoch_seconds_total", float("nan")))
    return total / 60


def table(folder: Path) -> str:
    m = RunFolder(folder).read_json(rf.METRICS)  # not .metrics(): a folder never evaluated is an error here
    test, dedup, op = m["test"], m["test_dedup"], m["test"]["at_threshold"]
    ece = m["calibration"]["test"]["ece_after"]
    ref = m.get("refusal", {})
    n_pos = test["confusion"][1][0] + test["confusion"][1][1]
    tp_op = op["confusion"][1][1]
    correct = test["confusion"][0][0] + test["confusion"][1][1]
    gap = abs(dedup["auc"]["value"] - test["auc"]["value"])
    refused = ref.get("test_refused", float("nan"))
    minutes = training_minutes(folder)
    rows = [
        ("ROC-AUC >= 0.970", fmt(test["auc"]), test["auc"]["value"] >= 0.970),
        (
            "accuracy >= 0.90 at 0.5",
            f"{fmt(test['accuracy'])} ({correct}/{test['n']})",
            test["accuracy"]["value"] >= 0.90,
        ),
        (
            f"sensitivity >= 0.95 at the validation-chosen threshold ({m['threshold']['value']:.3f}, "
            f"`{m['threshold']['policy']}`)",
            f"{fmt(op['recall'])} ({tp_op}/{n_pos})",
            op["recall"]["value"] >= 0.95,
        ),
        ("specificity >= 0.80 there", fmt(op["specificity"]), op["specificity"]["value"] >= 0.80),
        ("ECE after calibration <= 0.03", f"{ece:.3f}", ece <= 0.03),
        ("test_dedup AUC within 0.01 of test", f"{dedup['auc']['value']:.3f} (gap {gap:.3f})", gap <= 0.01),
        (
            "refusal AUROC >= 0.99",
            f"{ref.get('auroc_test_vs_non_lesion', float('nan')):.4f}",
            ref.get("auroc_test_vs_non_lesion", 0) >= 0.99,
        ),
        ("<= 1% of test lesions refused", f"{refused:.4f} ({round(refused * test['n'])}/{test['n']})", refused <= 0.01),
        ("trainable in <= 90 min on 2 CPU cores", f"{minutes:.1f} min", minutes <= 90),
    ]
    lines = [f"### {folder.name}", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'met' if ok else '**not met**'} |" for t, v, ok in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n\n".join(table(Path(a)) for a in sys.argv[1:]))
