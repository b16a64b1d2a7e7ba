"""The study's Table 1 next to lesionlab models, read from evaluated run and ensemble folders.

    python bench/compare_models.py LABEL=RUN_OR_ENSEMBLE_DIR ...
    python bench/compare_models.py --candidates runs/r2-lite0 runs/r2-lite1 ...

The first form prints one markdown table (docs/results.md, section 2.1): the study's rows (threshold 0.5,
no CIs published) and, per model, test and test_dedup at 0.5 and at the validation-chosen threshold,
with 95% CIs, ECE after calibration and CPU training time (the sum of the members' measured epoch
seconds). The second ranks every single run and every ensemble of them by validation ROC-AUC of the
mean of the members' calibrated probabilities (what ``lesionlab ensemble`` builds; its own temperature
does not change the AUC), with the summed training time; nothing is retrained or re-predicted.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from sklearn.metrics import roc_auc_score

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.ensemble import build as ensemble
from lesionlab.evaluation.report import fmt
from lesionlab.sweep.report import STUDY_TABLE1

COLUMNS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def members(model_dir: Path) -> list[Path]:
    return ensemble.member_dirs(model_dir) if (model_dir / "ensemble.json").exists() else [model_dir]


def training_minutes(model_dir: Path) -> float:
    """Sum of the members' measured epoch seconds (what training cost; evaluation not included)."""
    return (
        sum(float(files.read_json(m / "config.json")["timing"]["epoch_seconds_total"]) for m in members(model_dir)) / 60
    )


def study_rows() -> list[str]:
    out = []
    for s in STUDY_TABLE1.values():
        cells = [f"{s[c]:.3f}" if c in s else "n/a" for c in COLUMNS]
        out.append(
            f"| study: {s['label']} (Keras, lr {s['lr']:g}, {s['epochs']} ep.) | test | 0.5 | "
            + " | ".join(cells)
            + " | n/a | n/a (Colab) |"
        )
    return out


def model_rows(label: str, model_dir: Path) -> list[str]:
    m = files.read_json(model_dir / "metrics.json")
    minutes = training_minutes(model_dir)
    thr = m["threshold"]["value"]
    out = []
    for split in ("test", "test_dedup"):
        ece = m["calibration"][split]["ece_after"]
        for name, block in (("0.5", m[split]), (f"{thr:.3f} (val)", m[split]["at_threshold"])):
            out.append(
                f"| {label} | {split} | {name} | "
                + " | ".join(fmt(block[c]) for c in COLUMNS)
                + f" | {ece:.3f} | {minutes:.0f} |"
            )
    return out


def table(models: list[tuple[str, Path]]) -> str:
    head = (
        "| model | split | threshold | " + " | ".join(COLUMNS) + " | ECE (calibrated) | CPU training, min |\n"
        "|---|---|---|" + "---|" * (len(COLUMNS) + 2)
    )
    body = study_rows() + [r for label, d in models for r in model_rows(label, d)]
    return head + "\n" + "\n".join(body)


def _val_scores(run: Path) -> dict:
    """The run's logits as its evaluation left them (TTA or not, as calibrated); refuses stale files."""
    tta = bool(files.read_json(run / rf.CALIBRATION).get("tta", False))
    scores = ensemble.scores_from_predictions(run, tta)
    if scores is None:
        raise SystemExit(f"{run}: predictions.csv is missing or stale; run `lesionlab evaluate {run}` again")
    return scores


def rank_candidates(runs: list[Path]) -> str:
    """Every non-empty subset of ``runs`` by validation AUC of the mean calibrated probability, combined
    exactly as ``lesionlab ensemble`` does (``ensemble.combine``)."""
    ensemble.check_same_split(runs)
    scores = {r: _val_scores(r) for r in runs}
    temps = {r: float(files.read_json(r / rf.CALIBRATION).get("temperature", 1.0)) for r in runs}
    rows = []
    for n in range(1, len(runs) + 1):
        for combo in itertools.combinations(runs, n):
            val = ensemble.combine([scores[r] for r in combo], [temps[r] for r in combo])["val"]
            rows.append(
                (
                    roc_auc_score(val.y, val.logits),
                    float(((val.logits >= 0) == (val.y > 0.5)).mean()),
                    sum(training_minutes(r) for r in combo),
                    " + ".join(r.name for r in combo),
                )
            )
    rows.sort(key=lambda r: -r[0])
    lines = ["| rank | model | val AUC | val accuracy at 0.5 | CPU training, min |", "|---|---|---|---|---|"]
    lines += [
        f"| {i} | {name} | {auc:.4f} | {acc:.3f} | {mins:.0f} |" for i, (auc, acc, mins, name) in enumerate(rows, 1)
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="LABEL=DIR of an evaluated run or ensemble")
    ap.add_argument("--candidates", nargs="+", type=Path, help="evaluated runs to rank, alone and in ensembles")
    args = ap.parse_args()
    if args.candidates:
        print(rank_candidates(args.candidates))
    if args.models:
        print(table([(label, Path(d)) for label, d in (m.split("=", 1) for m in args.models)]))


if __name__ == "__main__":
    main()
