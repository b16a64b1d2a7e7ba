"""Per-image scores on disk, read back to compare two runs on the same images.

A run's splits are in ``predictions.csv`` (written by ``evaluate_run``); its external sets in
``external_predictions.csv`` (written by ``evaluate_external``: one row per scored image, ``set,relpath,label,
diagnosis,probability,refused``; a later evaluation of a set replaces that set's rows and keeps the others). The
probabilities are calibrated P(malignant), the ones the run's threshold applies to. Two runs evaluated on one set
can then be compared image by image (``metrics.paired_differences``), which is how the ablation tells a real
difference from the noise that their separate CIs share.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from lesionlab import files
from lesionlab.runs import EXTERNAL_PREDICTIONS, PREDICTIONS

EXTERNAL_FIELDS = ("set", "relpath", "label", "diagnosis", "probability", "refused")


class Scored(Protocol):
    """What is written per image: ``evaluation.external.ExternalScores`` has these."""

    relpaths: list[str]
    labels: np.ndarray
    diagnoses: list[str]
    probabilities: np.ndarray
    refused: np.ndarray


def write_external_predictions(run_dir: str | Path, sets: Mapping[str, Scored]) -> None:
    """Replaces the rows of ``sets`` in the run's external_predictions.csv (atomically), keeping other sets'."""
    path = Path(run_dir) / EXTERNAL_PREDICTIONS
    kept = [r for r in _rows(path) if r["set"] not in sets]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXTERNAL_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    for name, s in sets.items():
        for r, y, dx, p, refused in zip(s.relpaths, s.labels, s.diagnoses, s.probabilities, s.refused):
            w.writerow({"set": name, "relpath": r, "label": int(y), "diagnosis": dx, "probability": f"{p:.6f}",
                        "refused": int(bool(refused))})  # fmt: skip
    files.atomic_write_text(path, buf.getvalue())


def read_scores(run_dir: str | Path, name: str) -> dict[str, tuple[int, float]]:
    """``relpath -> (label, probability)`` of split ``name`` (``test_dedup:isic-kaggle``, ``val``, ...) from
    predictions.csv, or of external set ``name`` from external_predictions.csv; empty if the run has neither."""
    run = Path(run_dir)
    split = {r["relpath"]: r for r in _rows(run / PREDICTIONS) if r["split"] == name}
    rows = split or {r["relpath"]: r for r in _rows(run / EXTERNAL_PREDICTIONS) if r["set"] == name}
    return {k: (int(r["label"]), float(r["probability"])) for k, r in rows.items()}


def aligned(a: Mapping[str, tuple[int, float]], b: Mapping[str, tuple[int, float]]) -> tuple[np.ndarray, ...]:
    """Labels and both runs' probabilities on the images the two hold in common, in a fixed (sorted) order.
    Raises ValueError where a shared image carries two different labels (not the same set)."""
    common = sorted(set(a) & set(b))
    bad = [k for k in common if a[k][0] != b[k][0]]
    if bad:
        raise ValueError(f"{len(bad)} images are labelled differently in the two runs, e.g. {bad[0]}")
    y = np.array([a[k][0] for k in common], dtype=int)
    return y, np.array([a[k][1] for k in common]), np.array([b[k][1] for k in common])


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
