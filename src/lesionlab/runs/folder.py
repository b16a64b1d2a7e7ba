"""RunFolder: reads and writes a run or ensemble folder's files; every write is atomic."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from lesionlab import files
from lesionlab.data.dataset import Dataset
from lesionlab.data.sample import Sample
from lesionlab.runs.names import (
    CALIBRATION,
    CONFIG,
    ENSEMBLE,
    HISTORY,
    METRICS,
    MODEL,
    PREPROCESS,
    REFUSAL,
    REFUSAL_SCORES,
    REPORT,
    SCHEMA_VERSION,
    SKIPPED,
    SPLITS,
    STATE,
    RunError,
    migrate,
)
from lesionlab.runs.records import OperatingPoint, RunConfig, ScoreRow, SplitRow


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
        return self._listed(split, self.relpaths(split), pool)

    @staticmethod
    def _listed(split: str, rel: list[str], pool: Iterable[Sample]) -> list[Sample]:
        by_rel = {s.relpath: s for s in pool}
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
        rows = self.split_rows()
        train = {r.relpath for r in rows if r.split == "train"}
        return {
            "train": [s for s in dataset.train if s.relpath in train],  # the data folder's order
            "val": self._listed("val", [r.relpath for r in rows if r.split == "val"], dataset.train),
            **dataset.test_splits(),  # test, test_dedup, and each source's
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

    def write_operating_point(self, op: OperatingPoint, provenance: Mapping[str, Any] | None = None) -> None:
        """calibration.json (with ``provenance``, when given, under that key: where the operating point was fitted,
        e.g. a site sample); an exported model's preprocess.json carries a copy for other runtimes: kept current."""
        extra = {"provenance": dict(provenance)} if provenance else {}
        files.atomic_write_json(self.path / CALIBRATION, {**op.to_dict(), **extra})
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
