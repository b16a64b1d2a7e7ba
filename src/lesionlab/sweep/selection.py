"""The sweep's results table and the study's selection rule, from finished trials' histories."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionlab import files
from lesionlab.sweep.grid import SweepGrid, Trial

RESULT_FIELDS = ["backbone", "lr", "epochs", "seed", "val_accuracy", "val_loss", "val_auc", "train_seconds"]
SELECTION_RULE = (
    "per backbone, the (lr, epochs) with the best validation accuracy after that many epochs "
    "(mean over seeds); ties: lower validation loss, then fewer epochs"
)


def result_rows(grid: SweepGrid, records: dict[Trial, dict]) -> list[dict]:
    """A row per backbone x lr x epochs x seed; train_seconds is the trial's time up to that epoch."""
    rows = []
    for trial in grid.trials():
        history = records[trial]["history"]
        for e in grid.epochs:
            h = history[e - 1]
            rows.append(
                {
                    "backbone": trial.backbone,
                    "lr": trial.lr,
                    "epochs": e,
                    "seed": trial.seed,
                    "val_accuracy": h["val_accuracy"],
                    "val_loss": h["val_loss"],
                    "val_auc": h["val_auc"],
                    "train_seconds": sum(float(x["seconds"]) for x in history[:e]),
                }
            )
    return rows


def write_results(path: Path, rows: list[dict]) -> None:
    """results.csv: the rows of :func:`result_rows`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "lr": f"{r['lr']:g}", "train_seconds": f"{r['train_seconds']:.3f}"})
    files.atomic_write_text(path, buf.getvalue())


@dataclass(frozen=True)
class Choice:
    backbone: str
    lr: float
    epochs: int
    seed: int  # the seed whose model is kept (the best on validation among seeds at this lr and epochs)
    val_accuracy: float  # mean over seeds, the selection criterion
    val_loss: float


def select(rows: list[dict]) -> dict[str, Choice]:
    """The study's rule: best validation accuracy; ties: lower validation loss, then fewer epochs."""
    by_cell: dict[tuple[str, float, int], list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["backbone"], r["lr"], r["epochs"]), []).append(r)
    best: dict[str, tuple] = {}
    for (bb, lr, ep), rs in by_cell.items():
        acc = float(np.mean([r["val_accuracy"] for r in rs]))
        loss = float(np.mean([r["val_loss"] for r in rs]))
        key = (-acc, loss, ep)
        if bb not in best or key < best[bb][0]:
            seed_row = min(rs, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["seed"]))
            best[bb] = (key, Choice(bb, lr, ep, seed_row["seed"], acc, loss))
    return {bb: choice for bb, (_, choice) in best.items()}
