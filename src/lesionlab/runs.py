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

from __future__ import annotations

import csv
import io
import platform
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from lesionlab import files
from lesionlab.data.dataset import Dataset
from lesionlab.data.sample import Sample
from lesionlab.errors import LesionlabError

# ------------------------------------------------------------------ file names

CONFIG = "config.json"
SPLITS = "splits.csv"
HISTORY = "history.csv"
MODEL = "model.pt"
STATE = "train_state.pt"  # resume state; removed when training finishes
SKIPPED = "skipped_files.txt"
METRICS = "metrics.json"
REPORT = "report.md"
PREDICTIONS = "predictions.csv"
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

RUN_KIND = "lesionlab-run"
ENSEMBLE_KIND = "lesionlab-ensemble"

#: 2: config.json records every training option and its ``schema_version``. 1 (no version): options added after
#: the first release were left out while off (see ``migrate``).
SCHEMA_VERSION = 2
#: Training options that schema-1 runs did not record when they were off, and their value then.
SCHEMA1_TRAIN_DEFAULTS: Mapping[str, Any] = {"ema_decay": 0.0, "fold": 0, "also_val_fold": -1}
#: Schema-1 runs written before bf16 training existed trained in fp32.
SCHEMA1_PRECISION = "fp32"


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


# ------------------------------------------------------------------ typed views of the files


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into the network's input."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "shorter-side-bicubic+center-crop"
    channels: str = "RGB"
    layout: str = "NCHW"
    scale: str = "1/255"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        keep = {k: d[k] for k in ("resize", "channels", "layout", "scale") if k in d}
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), **keep)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(mean=list(self.mean), std=list(self.std))
        return d


@dataclass(frozen=True)
class OperatingPoint:
    """Temperature and threshold fitted on validation, and whether they were fitted on TTA scores."""

    model_id: str
    threshold: float
    policy: str
    temperature: float = 1.0
    tta: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], default_id: str = "") -> OperatingPoint:
        return cls(
            d.get("model_id") or default_id,
            float(d["threshold"]),
            d.get("policy") or d.get("threshold_policy") or "fixed:0.5",
            float(d.get("temperature", 1.0)),
            bool(d.get("tta", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """``config.json``, migrated to the current schema; ``raw`` holds all of it."""

    raw: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str:
        return str(self.raw.get("kind", RUN_KIND))

    @property
    def backbone(self) -> str:
        return str(self.raw["backbone"])

    @property
    def mode(self) -> str:
        return str(self.raw["mode"])

    @property
    def title(self) -> str:
        return f"{self.backbone} ({self.mode})"

    @property
    def weights(self) -> dict[str, Any]:
        return dict(self.raw.get("weights", {}))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.raw["preprocessing"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.raw.get("data", {}))

    @property
    def data_root(self) -> Path:
        return Path(self.raw["data"]["root"])

    @property
    def classes(self) -> tuple[str, str]:
        a, b = self.raw["data"]["classes"]
        return str(a), str(b)

    @property
    def train(self) -> dict[str, Any]:
        return dict(self.raw.get("train", {}))

    @property
    def val_folds(self) -> list[int]:
        """The validation folds of a run (one, or two for an inner run of a nested cross-fit)."""
        d = self.data
        return sorted({int(d.get("fold", 0))} | ({int(d["also_val_fold"])} if "also_val_fold" in d else set()))


@dataclass(frozen=True)
class SplitRow:
    """One line of splits.csv. ``members`` (cross-fit ensembles only): the members that held the image out."""

    relpath: str
    label: int
    split: str
    members: str = ""


@dataclass(frozen=True)
class ScoreRow:
    """One line of refusal_scores.csv: an image of a set (test, non_lesion), its detector score, refused or not."""

    set: str
    name: str
    score: float
    refused: bool


# ------------------------------------------------------------------ the folder


class RunFolder:
    """A run or ensemble folder. Reading never writes; every write is atomic (temp file, then rename)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    # ---------------------------------------------------------- what the folder is

    @property
    def is_ensemble(self) -> bool:
        return self.has(ENSEMBLE)

    @property
    def state(self) -> str:
        """``new`` (no config), ``training`` (unfinished: resumable), ``trained`` or ``evaluated``."""
        if not self.has(CONFIG) or not (self.has(MODEL) or self.is_ensemble):
            return "new" if not self.has(STATE) else "training"
        if self.has(STATE):
            return "training"
        return "evaluated" if self.has(METRICS) and self.has(CALIBRATION) else "trained"

    def require_trained(self) -> RunFolder:
        """Raises RunError unless this is a finished training run (config.json and model.pt)."""
        if not self.has(CONFIG) or not self.has(MODEL):
            raise RunError(
                f"{self.path} is not a finished lesionlab run (needs {CONFIG} and {MODEL}); "
                "create one with `lesionlab train --out DIR`"
            )
        return self

    # ---------------------------------------------------------- config.json

    @cached_property
    def config(self) -> RunConfig:
        if not self.has(CONFIG):
            raise RunError(f"{self.path} has no {CONFIG}; is it a lesionlab run folder?")
        return RunConfig(migrate(files.read_json(self.path / CONFIG)))

    def write_config(self, config: Mapping[str, Any]) -> None:
        content = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in config.items() if k != "schema_version"}}
        files.atomic_write_json(self.path / CONFIG, content)
        self.__dict__.pop("config", None)

    # ---------------------------------------------------------- splits.csv

    def split_rows(self) -> list[SplitRow]:
        if not self.has(SPLITS):
            raise RunError(f"{self.path} has no {SPLITS}; it was not written by `lesionlab train`")
        with open(self.path / SPLITS, newline="") as f:
            return [
                SplitRow(r["relpath"], int(r["label"]), r["split"], r.get("members") or "") for r in csv.DictReader(f)
            ]

    def relpaths(self, split: str) -> list[str]:
        """The files of one split, in splits.csv's order."""
        return [r.relpath for r in self.split_rows() if r.split == split]

    def samples(self, split: str, pool: Iterable[Sample]) -> list[Sample]:
        """The samples of ``pool`` listed under ``split``, in splits.csv's order; RunError if any is missing."""
        by_rel = {s.relpath: s for s in pool}
        rel = self.relpaths(split)
        missing = [r for r in rel if r not in by_rel]
        if missing:
            raise RunError(
                f"{len(missing)} {split} files of this run are not in the data folder (e.g. {missing[0]}); "
                "pass the --data the run was trained on"
            )
        return [by_rel[r] for r in rel]

    def write_splits(self, splits: Mapping[str, Iterable[Sample]], names: Iterable[str] = ("train", "val", "test")):
        lines = ["relpath,label,split"] + [f"{s.relpath},{s.label},{n}" for n in names for s in splits[n]]
        files.atomic_write_text(self.path / SPLITS, "\n".join(lines) + "\n")

    def dataset_splits(self, dataset: Dataset) -> dict[str, list[Sample]]:
        """Train and validation as recorded at training time (splits.csv); test and test_dedup from the data."""
        fixed = dataset.splits()
        train = set(self.relpaths("train"))
        return {
            "train": [s for s in dataset.train if s.relpath in train],  # the data folder's order
            "val": self.samples("val", dataset.train),
            "test": fixed["test"],
            "test_dedup": fixed["test_dedup"],
        }

    def write_split_rows(self, rows: Iterable[SplitRow]) -> None:
        """splits.csv with a ``members`` column (cross-fit ensembles)."""
        body = "".join(f"{r.relpath},{r.label},{r.split},{r.members}\n" for r in rows)
        files.atomic_write_text(self.path / SPLITS, "relpath,label,split,members\n" + body)

    # ---------------------------------------------------------- history.csv, skipped files

    def write_history(self, rows: list[dict[str, Any]], fields: list[str]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        files.atomic_write_text(self.path / HISTORY, buf.getvalue())

    def history(self) -> list[dict[str, str]]:
        if not self.has(HISTORY):
            return []
        with open(self.path / HISTORY, newline="") as f:
            return list(csv.DictReader(f))

    def write_skipped(self, bad: Iterable[tuple[str, str]]) -> None:
        bad = list(bad)
        if bad:
            files.atomic_write_text(self.path / SKIPPED, "".join(f"{p}\t{r}\n" for p, r in bad))

    # ---------------------------------------------------------- the operating point

    def operating_point(self) -> OperatingPoint | None:
        """calibration.json (written by evaluation), else the copy in preprocess.json (a folder holding only the
        exported model); None when neither exists."""
        if self.has(CALIBRATION):
            return OperatingPoint.from_dict(files.read_json(self.path / CALIBRATION), self.path.name)
        if self.has(PREPROCESS):
            spec = files.read_json(self.path / PREPROCESS)
            if "threshold" in spec:
                return OperatingPoint.from_dict(spec, self.path.name)
        return None

    def require_operating_point(self) -> OperatingPoint:
        """A model without its validation-chosen threshold would silently label at 0.5: refuse it."""
        op = self.operating_point()
        if op is None:
            raise RunError(
                f"{self.path} has no operating point ({CALIBRATION}): it was trained with --no-eval "
                f"or its evaluation failed; run `lesionlab evaluate {self.path}` first"
            )
        return op

    def write_operating_point(self, op: OperatingPoint) -> None:
        """calibration.json; an exported model's preprocess.json carries a copy for other runtimes: kept current."""
        files.atomic_write_json(self.path / CALIBRATION, op.to_dict())
        if self.has(PREPROCESS):
            spec = files.read_json(self.path / PREPROCESS)
            spec.update(
                model_id=op.model_id,
                threshold=op.threshold,
                threshold_policy=op.policy,
                temperature=op.temperature,
                tta=op.tta,
            )
            files.atomic_write_json(self.path / PREPROCESS, spec)

    def forget_operating_point(self) -> None:
        """After a failed evaluation nothing servable may remain."""
        for name in (CALIBRATION, METRICS):
            (self.path / name).unlink(missing_ok=True)

    # ---------------------------------------------------------- metrics, report, other JSON

    def metrics(self) -> dict[str, Any]:
        return files.read_json(self.path / METRICS) if self.has(METRICS) else {}

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        files.atomic_write_json(self.path / METRICS, metrics)

    def write_report(self, text: str) -> None:
        files.atomic_write_text(self.path / REPORT, text)

    def refusal(self) -> dict[str, Any]:
        return files.read_json(self.path / REFUSAL) if self.has(REFUSAL) else {}

    def refusal_scores(self) -> list[ScoreRow] | None:
        """refusal_scores.csv, or None when the detector was not measured (no refusal.json beside it)."""
        if not self.has(REFUSAL_SCORES) or not self.has(REFUSAL):
            return None
        with open(self.path / REFUSAL_SCORES, newline="") as f:
            return [ScoreRow(r["set"], r["name"], float(r["score"]), r["refused"] == "1") for r in csv.DictReader(f)]

    def write_refusal(self, result: Mapping[str, Any], scores: Iterable[ScoreRow] | None = None) -> None:
        if scores is not None:
            body = "".join(f"{r.set},{r.name},{r.score:.4f},{int(r.refused)}\n" for r in scores)
            files.atomic_write_text(self.path / REFUSAL_SCORES, "set,name,score,refused\n" + body)
        files.atomic_write_json(self.path / REFUSAL, result)

    def read_json(self, name: str) -> Any:
        return files.read_json(self.path / name)

    def write_json(self, name: str, obj: Any) -> None:
        files.atomic_write_json(self.path / name, obj)

    # ---------------------------------------------------------- ensembles

    def members(self, key: str = "members") -> list[Path]:
        """Members (or, with key="inner", the inner runs) listed in ensemble.json; relative paths are relative to
        the ensemble folder."""
        if not self.is_ensemble:
            raise RunError(f"{self.path} has no {ENSEMBLE}; create one with `lesionlab ensemble RUN RUN --out DIR`")
        spec = files.read_json(self.path / ENSEMBLE)
        return [p if p.is_absolute() else (self.path / p).resolve() for p in map(Path, spec.get(key, []))]


def require_run(run_dir: str | Path) -> Path:
    """``run_dir`` if it is a finished training run, else RunError saying how to make one."""
    return RunFolder(run_dir).require_trained().path
