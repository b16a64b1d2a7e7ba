"""Table 1 and Figures 1-3 of the study, written from a finished sweep's results and selected run folders.

Reads only what ``sweep.py`` leaves on disk (``results.csv`` rows and ``selected/<backbone>/`` run folders), so
the tables can be rebuilt without training anything.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.sweep.grid import SweepGrid
from lesionlab.sweep.selection import SELECTION_RULE, Choice

#: Lin & Ghanta 2024, Table 1 (test) and the selected hyper-parameters stated in their Results.
_STUDY_FIELDS = ("label", "lr", "epochs", "val_accuracy", "accuracy", "precision", "recall", "f1", "auc")
STUDY_TABLE1: dict[str, dict] = {
    name: dict(zip(_STUDY_FIELDS, row))
    for name, *row in [
        ("mobilenetv2", "MobileNetV2", 5e-3, 20, 0.8330, 0.8394, 0.7957, 0.8700, 0.8312, 0.9148),
        ("resnet50v2", "ResNet50V2", 1e-4, 50, 0.8159, 0.8136, 0.7580, 0.8667, 0.8087, 0.9136),
        ("efficientnetv2b0", "EfficientNetV2B0", 1e-3, 30, 0.8444, 0.8288, 0.8582, 0.7467, 0.7986, 0.9204),
        ("vgg16", "VGG16", 5e-3, 40, 0.8691, 0.8470, 0.7741, 0.9367, 0.8477, 0.9497),
    ]
}
TABLE_METRICS = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1-score"),
    ("auc", "AUC"),
)


def tuning_curves(rows: list[dict]) -> dict[str, dict[float, tuple[list[int], list[float]]]]:
    """Backbone -> lr -> (epochs, mean validation accuracy over seeds): the data of the study's Figure 1."""
    acc: dict[str, dict[float, dict[int, list[float]]]] = {}
    for r in rows:
        acc.setdefault(r["backbone"], {}).setdefault(r["lr"], {}).setdefault(r["epochs"], []).append(r["val_accuracy"])
    return {
        bb: {lr: (sorted(by_ep), [float(np.mean(by_ep[e])) for e in sorted(by_ep)]) for lr, by_ep in lines.items()}
        for bb, lines in acc.items()
    }


def _weights_label(config: dict) -> str:
    w = config["weights"]
    if not config["pretrained"]:
        return "RANDOM init (no ImageNet weights here)"
    where = Path(w["path"]).name if w.get("source") in ("weights-dir", "file") and w.get("path") else w["source"]
    return f"ImageNet ({where})"


def _model_label(bb: str, choice: Choice, config: dict) -> str:
    return f"{bb} (lr {choice.lr:g}, {choice.epochs} ep{'' if config['pretrained'] else ', RANDOM init'})"


def _ci(block: dict) -> str:
    lo, hi = block["ci95"]
    return f"{block['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def table1_markdown(
    grid: SweepGrid, choices: dict[str, Choice], metrics: dict[str, dict], configs: dict[str, dict]
) -> str:
    """The study's layout (a column per model, a row per metric), each selected model beside the study's."""
    cols: list[tuple[str, Callable[[str], str | None]]] = []  # (name, cell per row key; None: blank)
    for bb in choices:
        m, c, ch = metrics[bb]["test"], configs[bb], choices[bb]
        cols.append(
            (
                f"**{bb}** (here)",
                {
                    "weights": _weights_label(c),
                    "lr, epochs": f"{ch.lr:g}, {ch.epochs}",
                    "val": f"{ch.val_accuracy:.4f}",
                    "n": str(m["n"]),
                    **{k: _ci(m[k]) for k, _ in TABLE_METRICS},
                }.get,
            )
        )
        if bb in STUDY_TABLE1:
            cols.append(_study_column(bb))
    cols += [_study_column(bb) for bb in STUDY_TABLE1 if bb not in choices]
    row_names = [
        ("weights", "weights"),
        ("lr, epochs", "selected lr, epochs"),
        ("val", "validation accuracy"),
        *[(k, label) for k, label in TABLE_METRICS],
        ("n", "n (test)"),
    ]
    lines = ["| | " + " | ".join(name for name, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(get(key) or "" for _, get in cols) + " |" for key, label in row_names]
    dedup = ["| | " + " | ".join(f"**{bb}**" for bb in choices) + " |", "|---|" + "---|" * len(choices)]
    dedup += [
        f"| {label} | " + " | ".join(_ci(metrics[bb]["test_dedup"][k]) for bb in choices) + " |"
        for k, label in TABLE_METRICS
    ]
    dedup.append("| n (test_dedup) | " + " | ".join(str(metrics[bb]["test_dedup"]["n"]) for bb in choices) + " |")
    return "\n".join(
        [
            "# Table 1: the selected model of each backbone on test",
            "",
            f"Grid: lr {', '.join(f'{x:g}' for x in grid.lrs)} x epochs {', '.join(map(str, grid.epochs))} x "
            f"{len(grid.seeds)} seed(s), {grid.mode} backbone, batch {grid.batch_size}, Adam. Selection: "
            f"{SELECTION_RULE}. Metrics at threshold 0.5 with 95% stratified-bootstrap CIs; *study* columns are "
            "Lin & Ghanta 2024, Table 1 (no CIs published; their test split has 660 images as here).",
            "",
            *lines,
            "",
            "## test_dedup (test without near-duplicates of training images)",
            "",
            *dedup,
            "",
        ]
    )


def _study_column(bb: str) -> tuple[str, Callable[[str], str | None]]:
    s = STUDY_TABLE1[bb]
    cells = {
        "weights": "ImageNet (Keras)",
        "lr, epochs": f"{s['lr']:g}, {s['epochs']}",
        "val": f"{s['val_accuracy']:.4f}",
        "n": "660",
        **{k: f"{s[k]:.4f}" for k, _ in TABLE_METRICS},
    }
    return f"{s['label']} (*study*)", cells.get


def table1_rows(choices: dict[str, Choice], metrics: dict[str, dict], configs: dict[str, dict]) -> list[dict]:
    """table1.csv: a row per (model, split), ours with CIs and the study's test numbers."""
    rows = []
    for bb, ch in choices.items():
        c = configs[bb]
        for split in ("test", "test_dedup"):
            m = metrics[bb][split]
            row = {
                "split": split,
                "source": "lesionlab",
                "backbone": bb,
                "pretrained": c["pretrained"],
                "weights_source": c["weights"]["source"],
                "lr": f"{ch.lr:g}",
                "epochs": ch.epochs,
                "seed": ch.seed,
                "val_accuracy": ch.val_accuracy,
                "n": m["n"],
            }
            for k, _ in TABLE_METRICS:
                row.update({k: m[k]["value"], f"{k}_ci_low": m[k]["ci95"][0], f"{k}_ci_high": m[k]["ci95"][1]})
            rows.append(row)
    for bb, s in STUDY_TABLE1.items():
        rows.append(
            {
                "split": "test",
                "source": "study",
                "backbone": bb,
                "pretrained": True,
                "weights_source": "keras:imagenet",
                "lr": f"{s['lr']:g}",
                "epochs": s["epochs"],
                "val_accuracy": s["val_accuracy"],
                "n": 660,
                **{k: s[k] for k, _ in TABLE_METRICS},
            }
        )
    return rows


def _test_scores(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(run_dir / rf.PREDICTIONS, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["probability"]) for r in rows])


def write_reports(
    out: Path, grid: SweepGrid, rows: list[dict], choices: dict[str, Choice], selected: dict[str, Path]
) -> None:
    """table1.md, table1.csv and the study's Figures 1 (tuning), 2 (confusion, test, 0.5) and 3 (ROC, test)."""
    from lesionlab.evaluation import plots

    metrics = {bb: files.read_json(p / rf.METRICS) for bb, p in selected.items()}
    configs = {bb: files.read_json(p / rf.CONFIG) for bb, p in selected.items()}
    files.atomic_write_text(out / "table1.md", table1_markdown(grid, choices, metrics, configs))
    table = table1_rows(choices, metrics, configs)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in table for k in r)), lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    files.atomic_write_text(out / "table1.csv", buf.getvalue())
    labels = {bb: _model_label(bb, ch, configs[bb]) for bb, ch in choices.items()}
    panels = {
        f"{bb}{'' if configs[bb]['pretrained'] else ' (RANDOM init)'}": curves
        for bb, curves in tuning_curves(rows).items()
    }
    best = {
        f"{bb}{'' if configs[bb]['pretrained'] else ' (RANDOM init)'}": (ch.lr, ch.epochs, ch.val_accuracy)
        for bb, ch in choices.items()
    }
    plots.tuning_panels(panels, best, out / "figure1_tuning.png")
    plots.confusion_grid(
        {labels[bb]: metrics[bb]["test"]["confusion"] for bb in choices},
        out / "figure2_confusion.png",
        "test split, threshold 0.5",
    )
    plots.roc(
        {labels[bb]: _test_scores(selected[bb]) for bb in choices},
        out / "figure3_roc.png",
        "ROC on test: the selected model of each backbone",
    )
