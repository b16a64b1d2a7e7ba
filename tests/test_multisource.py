"""Several datasets in one run: the union trains, groups hold across sources, each source's test split is scored."""

from __future__ import annotations

import json

import pytest

from conftest import make_ham_subset, make_subset


@pytest.fixture(scope="module")
def ham_subset(tmp_path_factory):
    return make_ham_subset(tmp_path_factory.mktemp("ham") / "ham10000", {"mel": 12, "nv": 12})


@pytest.fixture(scope="module")
def two_source_run(shared_data, ham_subset, tmp_path_factory):
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.loop import train

    kaggle = make_subset(shared_data, tmp_path_factory.mktemp("k") / "isic-kaggle", n_train=15, n_test=6)
    out = tmp_path_factory.mktemp("runs") / "two"
    train(TrainConfig(epochs=2), [kaggle, ham_subset], out, progress=False)
    evaluate_run(out, n_resamples=100, progress=False)
    return out


def test_the_run_records_each_source_and_the_taxonomy(two_source_run):
    cfg = json.loads((two_source_run / "config.json").read_text())
    data = cfg["data"]
    assert [s["name"] for s in data["sources"]] == ["isic-kaggle", "ham10000"]
    assert len(data["specs"]) == 2 and "duplicate_pairs_linked" in data
    assert data["taxonomy"]["codes"]["mel"] == "malignant"
    assert data["n_train"] + data["n_val"] == 30 + 24  # both pools: 15 + 15 isic-kaggle train, 24 ham10000
    splits = (two_source_run / "splits.csv").read_text()
    assert "ham10000/images/ISIC_" in splits and "isic-kaggle/train/benign/" in splits


def test_metrics_keep_the_usual_splits_and_add_each_sources_test_split(two_source_run):
    m = json.loads((two_source_run / "metrics.json").read_text())
    assert {"val", "test", "test_dedup", "test:isic-kaggle", "test_dedup:isic-kaggle"} <= set(m)
    assert m["test:isic-kaggle"]["n"] == m["test"]["n"] == 12  # ham10000 has no fixed test split
    assert "test:ham10000" not in m


def test_the_run_evaluates_again_from_its_record(two_source_run):
    from lesionlab.evaluation.scoring import score_run

    scores = score_run(two_source_run, progress=False)
    assert len(scores["val"].relpaths) == json.loads((two_source_run / "config.json").read_text())["data"]["n_val"]


def test_the_reproducing_command_repeats_data_per_source():
    from lesionlab.cli.common import command_line

    assert command_line("train", data=["a", "ham10000:b?name=h"], epochs=2) == (
        "lesionlab train --data a --data 'ham10000:b?name=h' --epochs 2"
    )


def test_skip_invalid_trains_without_the_bad_rows_and_lists_them(shared_data, ham_subset, tmp_path):
    """A metadata row naming a missing image stops a run; --skip-invalid leaves it out, lists it in the run folder,
    and evaluation reads the data again with the same rows left out."""
    import csv
    import shutil

    from lesionlab.errors import DataError
    from lesionlab.evaluation.scoring import score_run
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.loop import train

    ham = tmp_path / "ham10000"
    shutil.copytree(ham_subset, ham, symlinks=True)
    rows = list(csv.DictReader((ham / "HAM10000_metadata.csv").open()))
    with (ham / "HAM10000_metadata.csv").open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[0], "image_id": "ISIC_9999999"})
    kaggle = make_subset(shared_data, tmp_path / "isic-kaggle", n_train=8, n_test=4)
    with pytest.raises(DataError, match="ISIC_9999999"):
        train(TrainConfig(epochs=1), [kaggle, ham], tmp_path / "stopped", progress=False)

    out = tmp_path / "run"
    train(TrainConfig(epochs=1), [kaggle, ham], out, progress=False, skip_invalid=True)
    skipped = (out / "skipped_files.txt").read_text()
    assert "ISIC_9999999" in skipped
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["skip_invalid"] is True and data["invalid_rows_skipped"] == 1 and data["skipped_files"] == 1
    scores = score_run(out, progress=False)  # reads the data again from the record: skips the same row
    assert len(scores["val"].relpaths) == data["n_val"]


def test_a_sweep_trains_on_several_sources(shared_data, ham_subset, tmp_path):
    from lesionlab.sweep import sweep as sw

    kaggle = make_subset(shared_data, tmp_path / "isic-kaggle", n_train=10, n_test=4)
    grid = sw.SweepGrid(backbones=("efficientnet_lite0",), lrs=(1e-3,), epochs=(1,), seeds=(0,))
    result = sw.run_sweep(grid, [kaggle, ham_subset], tmp_path / "sweep", n_resamples=50, progress=False, workers=1)
    run = result.selected["efficientnet_lite0"]
    data = json.loads((run / "config.json").read_text())["data"]
    assert [s["name"] for s in data["sources"]] == ["isic-kaggle", "ham10000"] and len(data["specs"]) == 2
    assert "test:isic-kaggle" in json.loads((run / "metrics.json").read_text())
    assert "specs" in json.loads((tmp_path / "sweep" / "sweep.json").read_text())
