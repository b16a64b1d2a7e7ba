"""The run folder: the one place that knows its file names and formats.

A run folder (``lesionlab train``) or an ensemble folder (``lesionlab ensemble``) is a directory a person can
read without the code: ``config.json`` (what was asked for, with a ``schema_version``), ``splits.csv`` (which
image was in which split), ``history.csv``, ``model.pt``, and after evaluation ``metrics.json``,
``calibration.json`` (the operating point), ``predictions.csv``, ``report.md``, ``figures/``, the lesion
detector (``ood.npz``, ``ood.json``) and its measurement (``refusal.json``, ``refusal_scores.csv``). Export adds
``model.onnx`` and ``preprocess.json``. :class:`RunFolder` reads and writes all of them; other modules ask it
instead of spelling file names or indexing ``config.json`` themselves.

Older folders keep loading: :func:`migrate` brings a ``config.json`` of any earlier schema to the current one
(the bundled model and the runs of earlier sessions have no ``schema_version``: they are schema 1).
"""

from lesionlab.runs.folder import RunFolder, require_run
from lesionlab.runs.names import (
    CALIBRATION,
    CONFIG,
    ENSEMBLE,
    ENSEMBLE_KIND,
    FIGURES,
    HISTORY,
    INT8,
    METRICS,
    MODEL,
    ONNX,
    OOD_ARRAYS,
    OOD_META,
    PREDICTIONS,
    PREPROCESS,
    QUANTIZATION,
    REFUSAL,
    REFUSAL_SCORES,
    REPORT,
    RUN_KIND,
    SCHEMA1_PRECISION,
    SCHEMA1_TRAIN_DEFAULTS,
    SCHEMA2_TRAIN_DEFAULTS,
    SCHEMA3_TRAIN_DEFAULTS,
    SCHEMA4_TRAIN_DEFAULTS,
    SCHEMA_VERSION,
    SITE_CALIBRATION,
    SITE_SCORES,
    SKIPPED,
    SPLITS,
    STATE,
    TENSORBOARD,
    RunError,
    migrate,
    package_versions,
)
from lesionlab.runs.records import (
    RESIZE_CROP,
    RESIZE_SQUASH,
    OperatingPoint,
    Preprocessing,
    RunConfig,
    ScoreRow,
    SplitRow,
)

__all__ = [
    "CALIBRATION",
    "CONFIG",
    "ENSEMBLE",
    "ENSEMBLE_KIND",
    "FIGURES",
    "HISTORY",
    "INT8",
    "METRICS",
    "MODEL",
    "ONNX",
    "OOD_ARRAYS",
    "OOD_META",
    "PREDICTIONS",
    "PREPROCESS",
    "QUANTIZATION",
    "REFUSAL",
    "REFUSAL_SCORES",
    "REPORT",
    "RESIZE_CROP",
    "RESIZE_SQUASH",
    "RUN_KIND",
    "SCHEMA1_PRECISION",
    "SCHEMA1_TRAIN_DEFAULTS",
    "SCHEMA2_TRAIN_DEFAULTS",
    "SCHEMA3_TRAIN_DEFAULTS",
    "SCHEMA4_TRAIN_DEFAULTS",
    "SCHEMA_VERSION",
    "SITE_CALIBRATION",
    "SITE_SCORES",
    "SKIPPED",
    "SPLITS",
    "STATE",
    "TENSORBOARD",
    "OperatingPoint",
    "Preprocessing",
    "RunConfig",
    "RunError",
    "RunFolder",
    "ScoreRow",
    "SplitRow",
    "migrate",
    "package_versions",
    "require_run",
]
