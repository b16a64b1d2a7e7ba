"""--log: each epoch also to TensorBoard or MLflow; the run folder stays the record, and a tracker never breaks
training (a failure to start is a clear error before the first epoch, a failure later a warning)."""

from __future__ import annotations

import importlib
import json

import pytest

from conftest import killed_after_epoch_2
from lesionlab.runs import RunFolder
from lesionlab.training import tracking
from lesionlab.training.config import ConfigError, TrainConfig
from lesionlab.training.loop import train
from lesionlab.training.tracking import TrackingError


def test_tensorboard_gets_every_epoch_in_the_run_folder(few_images, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(TrainConfig(epochs=2, batch_size=4, log="tensorboard"), few_images, tmp_path / "r", progress=False)
    assert json.loads((out / "config.json").read_text())["tracking"] == {"log": "tensorboard", "dir": "tensorboard"}
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    history = RunFolder(out).history()
    for tag, column in (("val/accuracy", "val_accuracy"), ("train/loss", "train_loss"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([float(h[column]) for h in history], rel=1e-6)


def test_mlflow_gets_the_settings_and_every_epoch_and_a_resumed_run_goes_on(few_images, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = TrainConfig(epochs=3, batch_size=4, log="mlflow", log_uri=uri)
    real = killed_after_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, few_images, tmp_path / "r", progress=False)
    first = json.loads((tmp_path / "r" / "config.json").read_text())["tracking"]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first["run_id"]).info.status == "KILLED"

    monkeypatch.setattr(RunFolder, "write_history", real)
    out = train(cfg, few_images, tmp_path / "r", progress=False)
    tracked = json.loads((out / "config.json").read_text())["tracking"]
    assert tracked == {**first, "log": "mlflow", "uri": uri}  # the same MLflow run
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == str(cfg.lr) and "device" not in run.data.params  # identity settings only
    assert run.data.tags["lesionlab.device"] == "cpu"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")})
    assert steps == [1, 2, 3]


def test_mlflow_defaults_to_a_local_mlruns_folder(few_images, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    out = train(TrainConfig(epochs=1, log="mlflow"), few_images, tmp_path / "r", progress=False)
    tracked = json.loads((out / "config.json").read_text())["tracking"]
    assert (
        tracked["uri"] == (tmp_path / "mlruns").as_uri() and (tmp_path / "mlruns" / tracked["experiment_id"]).is_dir()
    )


def test_a_missing_tracker_package_names_the_extra_before_any_data_is_read(monkeypatch, tmp_path):
    real = importlib.import_module

    def without_mlflow(name, *args):
        if name.startswith("mlflow"):
            raise ImportError("No module named 'mlflow'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_mlflow)
    with pytest.raises(TrackingError, match=r"pip install 'lesionlab\[mlflow\]'"):
        train(TrainConfig(log="mlflow"), tmp_path / "no-data-needed", tmp_path / "r", progress=False)


def test_a_tracker_that_cannot_start_is_a_clear_error(few_images, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(tracking.TensorBoardTracker, "__init__", broken)
    with pytest.raises(TrackingError, match=r"--log tensorboard could not start .*read-only"):
        train(TrainConfig(epochs=1, log="tensorboard"), few_images, tmp_path / "r", progress=False)


def test_a_tracker_failing_during_training_is_a_warning(few_images, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")

    def broken(self, epoch, values):
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardTracker, "_log", broken)
    with pytest.warns(RuntimeWarning, match=r"--log tensorboard: epoch 1 not logged .*disk full.*training goes on"):
        out = train(TrainConfig(epochs=1, log="tensorboard"), few_images, tmp_path / "r", progress=False)
    assert len(RunFolder(out).history()) == 1 and (out / "model.pt").exists()


def test_log_settings_are_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match="log must be one of"):
        TrainConfig(log="wandb")
    with pytest.raises(ConfigError, match="log_uri is MLflow's tracking URI"):
        TrainConfig(log_uri="http://localhost:5000")


def test_metrics_leave_out_what_is_undefined():
    row = {"epoch": 1, "train_loss": 0.5, "val_auc": float("nan"), "lr": 1e-3, "seconds": 2.0}
    assert tracking.metrics(row) == {"train/loss": 0.5, "lr": 1e-3, "epoch_seconds": 2.0}
