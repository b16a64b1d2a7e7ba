"""The run folder: the one place that knows its file names and formats."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from lesionlab.errors import LesionlabError

CONFIG = "config.json"
HISTORY = "history.csv"
MODEL = "model.pt"
METRICS = "metrics.json"
REPORT = "report.md"
PREDICTIONS = "predictions.csv"
CALIBRATION = "calibration.json"
FIGURES = "figures"
STATE = "train_state.pt"  # resume state; removed when training finishes
SKIPPED = "skipped_files.txt"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lesionlab", "torch", "torchvision", "timm", "numpy", "scikit-learn", "pillow", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunError(LesionlabError):
    """A run folder is missing or incomplete."""


def require_run(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists() or not (run_dir / MODEL).exists():
        raise RunError(
            f"{run_dir} is not a finished lesionlab run (needs {CONFIG} and {MODEL}); "
            "create one with `lesionlab train --out DIR`"
        )
    return run_dir
