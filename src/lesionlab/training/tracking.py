"""Each epoch's metrics also sent to an experiment tracker (``--log``): TensorBoard or MLflow, both optional extras.

The run folder stays the record (history.csv has every epoch; config.json's ``tracking`` block says where the
metrics also went); a tracker is a view of it while training runs. The interface is three calls:
:func:`start` (a run of the tracker for a run folder), ``log_epoch(row)`` (a history row) and ``finish``
(``with``: FINISHED, or KILLED / FAILED when training stopped on an exception).

A tracker that cannot start is a TrackingError before the first epoch (a missing package already before any data
is read: :func:`require`); one that fails later is a warning, and training goes on.

- ``tensorboard``: scalars written with ``torch.utils.tensorboard`` into ``RUN/tensorboard/``, one step per epoch
  (``tensorboard --logdir runs/``).
- ``mlflow``: an MLflow run in the experiment ``lesionlab`` with the run's identity settings as parameters and the
  epochs as metrics, at ``--log-uri`` (default: ``./mlruns``, MLflow's file store; MLflow 3 refuses a file store
  unless ``MLFLOW_ALLOW_FILE_STORE`` is true, which is set for a file-store URI when the environment does not say;
  ``sqlite:///mlflow.db`` or a server's ``http://`` URI need no such thing). A resumed run folder goes on logging to
  the MLflow run it started.
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from lesionlab import runs as rf
from lesionlab.errors import LesionlabError
from lesionlab.training.config import TrainConfig, identity_settings

#: The package each tracker needs, and the extra that installs it.
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
EXPERIMENT = "lesionlab"
#: history.csv's columns as tracker metric names (TensorBoard groups them by the part before the slash).
METRICS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "val_auc": "val/auc",
    "lr": "lr",
    "seconds": "epoch_seconds",
}


class TrackingError(LesionlabError):
    """A tracker that cannot start: its package is missing, or its store cannot be reached."""


def require(log: str) -> None:
    """TrackingError naming the extra to install when ``log``'s package is missing."""
    if log not in PACKAGES:
        return
    module, extra = PACKAGES[log]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(f"--log {log} needs the {extra} package ({e}): pip install 'lesionlab[{extra}]'") from None


def start(cfg: TrainConfig, run_dir: Path, config: dict[str, Any], previous: dict[str, Any] | None = None) -> Tracker:
    """The tracker ``cfg.log`` names, started for ``run_dir`` (``config``: its config.json content; ``previous``:
    the ``tracking`` block an unfinished earlier session of the run recorded, to go on with its run)."""
    require(cfg.log)
    try:
        if cfg.log == "tensorboard":
            return TensorBoardTracker(run_dir, config)
        if cfg.log == "mlflow":
            return MLflowTracker(cfg.log_uri, run_dir, config, previous or {})
    except LesionlabError:
        raise
    except Exception as e:
        raise TrackingError(f"--log {cfg.log} could not start ({type(e).__name__}: {e})") from e
    return Tracker()


def metrics(row: dict[str, Any]) -> dict[str, float]:
    """A history row's metrics by tracker name; undefined ones (NaN AUC on a one-class validation set) left out."""
    out = {name: float(row[key]) for key, name in METRICS.items() if key in row}
    return {k: v for k, v in out.items() if math.isfinite(v)}


class Tracker:
    """``--log none``: nothing sent. Subclasses implement ``_log`` and ``_finish``; a failure there is a warning."""

    name = "none"

    def record(self) -> dict[str, Any]:
        """config.json's ``tracking`` block: where the metrics also went ({} for none)."""
        return {}

    def log_epoch(self, row: dict[str, Any]) -> None:
        try:
            self._log(int(row["epoch"]), metrics(row))
        except Exception as e:  # never stop training for a view of its record
            self._warn(f"epoch {row.get('epoch')} not logged", e)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self._finish(status)
        except Exception as e:
            self._warn("not closed", e)

    def _log(self, epoch: int, values: dict[str, float]) -> None:
        pass

    def _finish(self, status: str) -> None:
        pass

    def _warn(self, what: str, e: Exception) -> None:
        warnings.warn(
            f"--log {self.name}: {what} ({type(e).__name__}: {e}); training goes on, and history.csv has every epoch",
            RuntimeWarning,
            stacklevel=3,
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.finish("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / rf.TENSORBOARD))
        settings = "\n".join(f"    {k}: {v}" for k, v in config.get("train", {}).items())
        self.writer.add_text("config/train", settings)  # indented: markdown shows it as written
        self.writer.flush()

    def record(self) -> dict[str, Any]:
        return {"log": self.name, "dir": rf.TENSORBOARD}

    def _log(self, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=epoch)
        self.writer.flush()  # visible while training runs

    def _finish(self, status: str) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, uri: str, run_dir: Path, config: dict[str, Any], previous: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # a client of its own: MLflow's global tracking URI (and its environment variable) stay as they are
        self.uri = uri or Path("mlruns").absolute().as_uri()
        if "://" not in self.uri or self.uri.startswith("file:"):  # a file store: asked for, so allowed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        self.run_id = self._earlier_run(previous)
        if self.run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=run_dir.name, tags={"lesionlab.run_folder": str(run_dir.resolve())}
            )
            self.run_id = run.info.run_id
            params = identity_settings(config.get("train", {}))
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        compute = config.get("compute", {})
        for key in ("device", "precision"):  # tags, not parameters: a resumed run may have moved
            if key in compute:
                self.client.set_tag(self.run_id, f"lesionlab.{key}", str(compute[key]))

    def _earlier_run(self, previous: dict[str, Any]) -> str | None:
        """The MLflow run an unfinished earlier session of this run folder logged to, if it is still there."""
        run_id = previous.get("run_id")
        if previous.get("log") != self.name or previous.get("uri") != self.uri or not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:
            return None
        return str(run_id)

    def record(self) -> dict[str, Any]:
        return {"log": self.name, "uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def _log(self, epoch: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        assert self.run_id is not None
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def _finish(self, status: str) -> None:
        assert self.run_id is not None
        self.client.set_terminated(self.run_id, status=status)
