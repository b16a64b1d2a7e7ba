"""The study's Table 1 rows next to lesionlab models, read from their metrics.json (for docs/results.md).

    python bench/compare_study.py "single: lite0 finetune + TTA=runs/tta/lite0-finetune=32" \
        "ensemble=runs/ens=65"

Each argument is NAME=MODEL_DIR=TRAIN_MINUTES (CPU training time measured for that model, all members).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lesionlab.evaluation.report import fmt
from lesionlab.sweep.report import STUDY_TABLE1

COLS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def study_rows() -> list[str]:
    rows = []
    for spec in STUDY_TABLE1.values():
        vals = " | ".join(f"{spec[c]:.3f}" if c in spec else "n/a" for c in COLS)
        rows.append(
            f"| study: {spec['label']} (Keras, lr {spec['lr']:g}, {spec['epochs']} ep.) | test | 0.5 | {vals} "
            "| n/a | n/a (Colab) |"
        )
    return rows


def model_rows(name: str, model_dir: Path, minutes: str) -> list[str]:
    m = json.loads((model_dir / "metrics.json").read_text())
    thr = m["threshold"]["value"]
    rows = []
    for split in ("test", "test_dedup"):
        ece = m["calibration"][split]["ece_after"]
        for label, block in (("0.5", m[split]), (f"{thr:.3f} (val)", m[split]["at_threshold"])):
            vals = " | ".join(fmt(block[c]) for c in COLS)
            rows.append(f"| {name} | {split} | {label} | {vals} | {ece:.3f} | {minutes} |")
    return rows


def main(args: list[str]) -> None:
    print(
        "| model | split | threshold | accuracy | precision | recall (sensitivity) | specificity | F1 | AUC "
        "| ECE (calibrated) | CPU training, min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(study_rows()))
    for arg in args:
        name, path, minutes = arg.rsplit("=", 2)
        print("\n".join(model_rows(name, Path(path), minutes)))


if __name__ == "__main__":
    main(sys.argv[1:])
