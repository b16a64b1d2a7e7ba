"""The run folder's file names, its schema version and the migration of older config.json files."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from lesionlab.errors import LesionlabError

CONFIG = "config.json"
SPLITS = "splits.csv"
HISTORY = "history.csv"
MODEL = "model.pt"
STATE = "train_state.pt"  # resume state; removed when training finishes
SKIPPED = "skipped_files.txt"
METRICS = "metrics.json"
REPORT = "report.md"
PREDICTIONS = "predictions.csv"
EXTERNAL_PREDICTIONS = "external_predictions.csv"  # the external sets' per-image scores
CALIBRATION = "calibration.json"
FIGURES = "figures"
OOD_ARRAYS = "ood.npz"  # the lesion detector
OOD_META = "ood.json"
REFUSAL = "refusal.json"  # the detector's measurement
REFUSAL_SCORES = "refusal_scores.csv"
ONNX = "model.onnx"
PREPROCESS = "preprocess.json"
INT8 = "model.int8.onnx"
QUANTIZATION = "quantization.json"
ENSEMBLE = "ensemble.json"
SITE_CALIBRATION = "site_calibration.json"  # a site-calibrated copy: where its operating point came from
SITE_SCORES = "site_scores.csv"  # the site sample's logits
TENSORBOARD = "tensorboard"  # --log tensorboard: the event files of the run's per-epoch scalars

RUN_KIND = "lesionlab-run"
ENSEMBLE_KIND = "lesionlab-ensemble"

#: 6: ``grad_checkpointing`` (recompute activations in fine-tuning; not part of a run's identity), and a run's
#: ``file_list_sha256`` no longer includes the files' mtimes (earlier runs are marked ``FILE_LIST_WITH_MTIMES``).
#: 5: the scaling issue's options (input_size, data_workers, max_steps) and ``compute.distributed``.
#: 4: where a run computes and reports (device, log, log_uri; not part of a run's identity) and config.json's
#: ``compute`` block. 3: the options of the transfer issue (target, colour constancy, resize). 2: config.json records
#: every training option and its ``schema_version``. 1 (no version): options added after the first release were left
#: out while off (see ``migrate``).
SCHEMA_VERSION = 6
#: Training options that schema-1 runs did not record when they were off, and their value then.
SCHEMA1_TRAIN_DEFAULTS: Mapping[str, Any] = {"ema_decay": 0.0, "fold": 0, "also_val_fold": -1}
#: Schema-1 runs written before bf16 training existed trained in fp32.
SCHEMA1_PRECISION = "fp32"
#: Training options added in schema 3, and the value that reproduces what earlier runs did.
SCHEMA2_TRAIN_DEFAULTS: Mapping[str, Any] = {"target": "binary", "color_constancy": "none", "resize": "crop"}
#: Training options added in schema 4: every earlier run trained on the CPU and sent its metrics nowhere else.
SCHEMA3_TRAIN_DEFAULTS: Mapping[str, Any] = {"device": "cpu", "log": "none", "log_uri": ""}
#: Training options added in schema 5: earlier runs used the backbone's input size, loaded images in the training
#: process and trained every step.
SCHEMA4_TRAIN_DEFAULTS: Mapping[str, Any] = {"input_size": 0, "data_workers": 0, "max_steps": 0}
#: Training options added in schema 6: earlier runs kept every activation for the backward pass.
SCHEMA5_TRAIN_DEFAULTS: Mapping[str, Any] = {"grad_checkpointing": False}
#: Set by ``migrate`` on runs of schema 5 and earlier: their ``file_list_sha256`` hashed the files' mtimes too.
FILE_LIST_WITH_MTIMES = "file_list_sha256_includes_mtimes"


class RunError(LesionlabError):
    """A run folder is missing, incomplete or not the kind the command needs."""


def migrate(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` content of any schema, brought to ``SCHEMA_VERSION`` (a new dict; the file is not touched)."""
    out = dict(config)
    version = int(out.get("schema_version", 1))
    if version > SCHEMA_VERSION:
        raise RunError(
            f"config.json has schema_version {version}, newer than this lesionlab understands ({SCHEMA_VERSION}); "
            "upgrade lesionlab"
        )
    if version < 2 and "train" in out:
        train = {**SCHEMA1_TRAIN_DEFAULTS, **out["train"]}
        train.setdefault("precision", SCHEMA1_PRECISION)
        out["train"] = train
    if version < 3 and "train" in out:
        out["train"] = {**SCHEMA2_TRAIN_DEFAULTS, **out["train"]}
    if version < 4 and "train" in out:
        out["train"] = {**SCHEMA3_TRAIN_DEFAULTS, **out["train"]}
    if version < 5 and "train" in out:
        out["train"] = {**SCHEMA4_TRAIN_DEFAULTS, **out["train"]}
    if version < 6 and "train" in out:
        out["train"] = {**SCHEMA5_TRAIN_DEFAULTS, **out["train"]}
    if version < 6 and "file_list_sha256" in out:
        out[FILE_LIST_WITH_MTIMES] = True
    out["schema_version"] = SCHEMA_VERSION
    return out


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, for config.json."""
    out = {"python": platform.python_version()}
    for pkg in ("lesionlab", "torch", "torchvision", "timm", "numpy", "scikit-learn", "pillow", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out
