"""The run folder type: file names, schema migration, splits, operating point, state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lesionlab import runs
from lesionlab.runs import OperatingPoint, RunError, RunFolder

# the config and calibration of the model bundled up to the twelfth session (schema 1, before schema_version)
SCHEMA1_MODEL = Path(__file__).resolve().parent / "reference" / "schema1_model"


def test_a_schema_1_model_loads_migrated():
    raw = json.loads((SCHEMA1_MODEL / runs.CONFIG).read_text())
    assert "schema_version" not in raw and "precision" not in raw["train"]
    config = RunFolder(SCHEMA1_MODEL).config
    assert config.raw["schema_version"] == runs.SCHEMA_VERSION
    assert config.train["precision"] == "fp32" and config.train["ema_decay"] == 0.0 and config.train["fold"] == 0
    assert config.backbone == "efficientnet_lite0" and config.preprocessing.input_size == 224
    op = RunFolder(SCHEMA1_MODEL).operating_point()
    assert op is not None and 0 < op.threshold < 1


def test_migrate_keeps_what_a_run_recorded_and_refuses_a_newer_schema():
    old = {"train": {"precision": "bf16", "fold": 3}, "backbone": "x"}
    new = runs.migrate(old)
    assert new["train"]["precision"] == "bf16" and new["train"]["fold"] == 3 and new["train"]["also_val_fold"] == -1
    assert "schema_version" not in old  # the input is not modified
    assert runs.migrate(new) == new
    with pytest.raises(RunError, match="newer"):
        runs.migrate({"schema_version": runs.SCHEMA_VERSION + 1})


def test_write_config_records_the_schema_version(tmp_path):
    run = RunFolder(tmp_path)
    run.write_config({"backbone": "b", "mode": "frozen", "train": {}})
    assert json.loads((tmp_path / runs.CONFIG).read_text())["schema_version"] == runs.SCHEMA_VERSION


def test_state_follows_the_files(tmp_path):
    run = RunFolder(tmp_path)
    assert run.state == "new"
    (tmp_path / runs.CONFIG).write_text("{}")
    (tmp_path / runs.MODEL).write_bytes(b"")
    assert run.state == "trained"
    (tmp_path / runs.STATE).write_bytes(b"")
    assert run.state == "training"
    (tmp_path / runs.STATE).unlink()
    (tmp_path / runs.METRICS).write_text("{}")
    run.write_operating_point(OperatingPoint("m", 0.3, "sensitivity:0.95", 1.2, True))
    assert run.state == "evaluated"
    assert run.operating_point() == OperatingPoint("m", 0.3, "sensitivity:0.95", 1.2, True)


def test_operating_point_falls_back_to_preprocess_json_and_is_kept_current_there(tmp_path):
    run = RunFolder(tmp_path)
    assert run.operating_point() is None
    with pytest.raises(RunError, match="lesionlab evaluate"):
        run.require_operating_point()
    (tmp_path / runs.PREPROCESS).write_text(json.dumps({"input_size": 224, "threshold": 0.4, "temperature": 2.0}))
    assert run.operating_point() == OperatingPoint(tmp_path.name, 0.4, "fixed:0.5", 2.0, False)
    run.write_operating_point(OperatingPoint("m", 0.25, "youden", 1.5, False))
    spec = json.loads((tmp_path / runs.PREPROCESS).read_text())
    assert spec["threshold"] == 0.25 and spec["threshold_policy"] == "youden" and spec["input_size"] == 224


def test_splits_round_trip_and_a_missing_file_is_named(tmp_path):
    from lesionlab.data.sample import Sample

    s = {
        name: [Sample(f"{name}/{i}.jpg", tmp_path / f"{i}.jpg", i % 2) for i in range(3)]
        for name in ("train", "val", "test")
    }
    run = RunFolder(tmp_path)
    run.write_splits(s)
    assert run.relpaths("val") == ["val/0.jpg", "val/1.jpg", "val/2.jpg"]
    assert [r.label for r in run.split_rows() if r.split == "train"] == [0, 1, 0]
    with pytest.raises(RunError, match=r"val/0\.jpg"):
        run.samples("val", s["train"])


def test_require_trained_says_how_to_make_a_run(tmp_path):
    with pytest.raises(RunError, match=r"lesionlab train --out"):
        RunFolder(tmp_path).require_trained()


def test_tiny_run_is_a_schema_2_folder(tiny_run):
    run = RunFolder(tiny_run)
    assert run.config.raw["schema_version"] == runs.SCHEMA_VERSION
    assert run.state == "evaluated"
    assert set(run.refusal()) >= {"threshold", "lesions", "non_lesion"}
    rows = run.refusal_scores()
    assert rows and {r.set for r in rows} == {"test", "non_lesion"}
