import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import killed_after_epoch_2, make_subset
from lesionlab import runs
from lesionlab.models.classifier import load_model
from lesionlab.runs import RunError, RunFolder
from lesionlab.training import config as train_config
from lesionlab.training import record
from lesionlab.training.config import TrainConfig
from lesionlab.training.features import BadDataError
from lesionlab.training.loop import train, train_epochs
from lesionlab.training.sources import FeatureSource


def assert_same_run(a, b) -> None:
    """Same history (but for the timings) and bit-identical saved weights."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(RunFolder(a).history()) == strip(RunFolder(b).history())
    ma, _ = load_model(a / "model.pt")
    mb, _ = load_model(b / "model.pt")
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k


@pytest.mark.parametrize("backbone", ["resnet50v2", "efficientnetv2b0", "vgg16"])
def test_study_backbones_train_one_epoch_from_random_init(backbone, few_images, tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):
        out = train(
            TrainConfig(backbone=backbone, epochs=1, input_size=64),  # small: the loop, not the numbers
            few_images,
            tmp_path / backbone,
            weights_dir=tmp_path,
            allow_random_init=True,
            progress=False,
        )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained"] is False and cfg["weights"]["source"] == "random"
    assert len(RunFolder(out).history()) == 1
    model, meta = load_model(out / "model.pt")
    assert meta["backbone"] == backbone
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1,)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_trains_the_whole_network(precision, few_images, shared_weights, tmp_path):
    cfg = TrainConfig(
        backbone="mobilenetv2", mode="finetune", epochs=1, batch_size=4, lr=1e-3, precision=precision, input_size=64
    )
    out = train(cfg, few_images, tmp_path / "ft", weights_dir=shared_weights, progress=False)
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == precision
    model, _ = load_model(out / "model.pt")
    from lesionlab.models.backbones import build_backbone, resolve_weights

    ref = build_backbone(resolve_weights("mobilenetv2", weights_dir=shared_weights))
    k = "conv_stem.weight"
    assert not torch.equal(model.backbone.state_dict()[k], ref.state_dict()[k])  # backbone moved
    # BatchNorm statistics stay frozen in finetune mode
    assert torch.equal(model.backbone.state_dict()["bn1.running_mean"], ref.state_dict()["bn1.running_mean"])


def test_precision_auto_means_bf16_only_for_finetune_on_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setattr(train_config, "bf16_supported", lambda: True)
    assert TrainConfig(mode="finetune").precision == "bf16"
    assert TrainConfig(mode="frozen").precision == "fp32"  # the head trains on cached fp32 features
    monkeypatch.setattr(train_config, "bf16_supported", lambda: False)
    assert TrainConfig(mode="finetune").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_runs_from_before_bf16_read_back_as_fp32(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"backbone": "efficientnet_lite0", "mode": "finetune"}}))
    assert record.config_from_run(tmp_path).precision == "fp32"


def test_resume_after_a_kill_equals_an_unbroken_run(few_images, tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=4, batch_size=4)
    unbroken = train(cfg, few_images, tmp_path / "a", progress=False)

    real = RunFolder.write_history
    calls = {"n": 0}

    def dies_in_epoch_3(run, rows, fields):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed before epoch 3 is recorded
        real(run, rows, fields)

    monkeypatch.setattr(RunFolder, "write_history", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, few_images, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "train_state.pt").exists()
    assert len(RunFolder(tmp_path / "b").history()) == 2
    monkeypatch.setattr(RunFolder, "write_history", real)
    resumed = train(cfg, few_images, tmp_path / "b", progress=False)
    assert not (resumed / "train_state.pt").exists()
    assert_same_run(resumed, unbroken)


def test_ema_is_what_is_kept_and_a_resumed_ema_run_equals_an_unbroken_one(
    few_images, shared_weights, tmp_path, monkeypatch
):
    cfg = TrainConfig(
        backbone="mobilenetv2",
        mode="finetune",
        epochs=3,
        batch_size=4,
        lr=1e-3,
        precision="fp32",
        augment="none",
        ema_decay=0.9,
        input_size=64,
    )
    unbroken = train(cfg, few_images, tmp_path / "a", weights_dir=shared_weights, progress=False)
    assert json.loads((unbroken / "config.json").read_text())["train"]["ema_decay"] == 0.9

    real = killed_after_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, few_images, tmp_path / "b", weights_dir=shared_weights, progress=False)
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)
    assert state["ema"] is not None and state["epoch"] == 1
    k = "conv_stem.weight"
    assert not torch.equal(state["ema"][f"backbone.{k}"], state["model"][f"backbone.{k}"])  # an average, not a copy
    monkeypatch.setattr(RunFolder, "write_history", real)
    resumed = train(cfg, few_images, tmp_path / "b", weights_dir=shared_weights, progress=False)
    assert_same_run(resumed, unbroken)


def test_settings_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(mode="frozen", ema_decay=0.99)
    with pytest.raises(ValueError, match=r"fold must be in 0..4"):
        TrainConfig(fold=5)
    assert TrainConfig(val_fraction=0.5, fold=1).fold == 1  # 0.5 makes two folds
    with pytest.raises(ValueError, match="must differ"):
        TrainConfig(fold=2, also_val_fold=2)


def test_a_new_run_records_every_option_and_its_schema_version(few_images, tmp_path):
    out = train(TrainConfig(epochs=1), few_images, tmp_path / "r", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["schema_version"] == runs.SCHEMA_VERSION
    assert config["train"] == dataclasses.asdict(TrainConfig(epochs=1))  # options that are off included
    assert {"ema_decay", "fold", "also_val_fold", "precision"} <= set(config["train"])


def _as_schema_1(run) -> None:
    config = json.loads((run / "config.json").read_text())
    del config["schema_version"]
    for key in ("ema_decay", "fold", "also_val_fold", "precision"):
        del config["train"][key]
    (run / "config.json").write_text(json.dumps(config))


def test_a_schema_1_run_folder_is_still_the_same_run(few_images, tmp_path):
    """Runs written before schema 2 left ema_decay, fold and also_val_fold out while off, and some predate
    precision: train with the same settings must see such a folder as finished, not as a different run."""
    cfg = TrainConfig(epochs=1)
    out = train(cfg, few_images, tmp_path / "old", progress=False)
    _as_schema_1(out)
    before = {name: (out / name).stat().st_mtime_ns for name in ("config.json", "model.pt", "history.csv")}

    assert train(cfg, few_images, out, progress=False) == out  # finished: nothing retrained or rewritten
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert "schema_version" not in json.loads((out / "config.json").read_text())
    assert record.config_from_run(out) == cfg
    with pytest.raises(RunError, match="settings differ: lr"):
        train(TrainConfig(epochs=1, lr=0.5), few_images, out, progress=False)


def test_an_unfinished_schema_1_run_resumes(few_images, tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=3, batch_size=4)
    unbroken = train(cfg, few_images, tmp_path / "a", progress=False)
    real = killed_after_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, few_images, tmp_path / "b", progress=False)
    monkeypatch.setattr(RunFolder, "write_history", real)
    _as_schema_1(tmp_path / "b")
    resumed = train(cfg, few_images, tmp_path / "b", progress=False)
    assert not (resumed / "train_state.pt").exists()
    assert json.loads((resumed / "config.json").read_text())["schema_version"] == runs.SCHEMA_VERSION
    assert_same_run(resumed, unbroken)


def test_a_run_resumes_on_a_fresh_copy_of_its_data_and_an_old_schema_run_too(few_images, tmp_path, monkeypatch):
    """A copy of the data (new mtimes, same files) is the same data: a run's identity hashes names, labels and
    sizes; a schema-5 run, whose hash had the mtimes too, is still recognised."""
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(few_images, data, symlinks=False)  # real files, whose mtimes the test may change
    cfg = TrainConfig(epochs=3, batch_size=4)
    unbroken = train(cfg, data, tmp_path / "a", progress=False)
    real = killed_after_epoch_2(monkeypatch)
    for name in ("b", "old"):
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / name, progress=False)
    monkeypatch.setattr(RunFolder, "write_history", real)
    from lesionlab.data.dataset import load_dataset

    legacy_hash = load_dataset(data).file_list_hash(mtimes=True)  # what schema 5 recorded
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config.update(schema_version=5, file_list_sha256=legacy_hash)
    del config["train"]["grad_checkpointing"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert_same_run(train(cfg, data, tmp_path / "old", progress=False), unbroken)

    later = 2_000_000_000  # 2033: every file rewritten, none changed
    for f in data.rglob("*.jpg"):
        os.utime(f, (later, later))
    assert load_dataset(data).file_list_hash(mtimes=True) != legacy_hash  # caches notice; a run does not
    resumed = train(cfg, data, tmp_path / "b", progress=False)
    # the feature cache keys on mtimes, so epoch 3 trains on features computed again: equal to rounding, not bits
    # (oneDNN may pick other kernels under another load)
    rows = lambda run: [{k: float(v) for k, v in r.items() if k != "seconds"} for r in RunFolder(run).history()]
    for got, want in zip(rows(resumed), rows(unbroken), strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    ma, mb = load_model(resumed / "model.pt")[0].state_dict(), load_model(unbroken / "model.pt")[0].state_dict()
    assert all(torch.allclose(ma[k].float(), mb[k].float(), atol=1e-5) for k in ma)


def test_other_settings_in_the_same_folder_are_refused(few_images, tmp_path):
    train(TrainConfig(epochs=1), few_images, tmp_path / "r", progress=False)
    with pytest.raises(RunError, match="settings differ: lr"):
        train(TrainConfig(epochs=1, lr=0.5), few_images, tmp_path / "r", progress=False)


def test_head_after_e_epochs_equals_a_separate_e_epoch_run():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    snapshots = {
        ep.result.epoch: {k: v.clone() for k, v in ep.module.state_dict().items()}
        for ep in train_epochs(FeatureSource(x, y, x, y), TrainConfig(epochs=5, batch_size=8), progress=False)
    }
    *_, last = train_epochs(FeatureSource(x, y, x, y), TrainConfig(epochs=3, batch_size=8), progress=False)
    short = last.module
    for k, v in short.state_dict().items():
        assert torch.equal(v, snapshots[3][k])


def test_bad_files_stop_training_unless_skipped(shared_data, tmp_path, image_files):
    data = make_subset(shared_data, tmp_path / "data", n_train=5, n_test=2)
    (data / "train" / "benign" / "broken.jpg").write_bytes(image_files["truncated"].read_bytes())
    (data / "train" / "malignant" / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadDataError) as e:
        train(TrainConfig(epochs=1), data, tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "train/benign/broken.jpg: corrupt or truncated" in msg
    assert "train/malignant/empty.jpg: empty file" in msg and "--skip-bad" in msg
    assert not (tmp_path / "run" / "model.pt").exists()
    out = train(TrainConfig(epochs=1), data, tmp_path / "run", skip_bad=True, progress=False)
    skipped = (out / "skipped_files.txt").read_text()
    assert "train/benign/broken.jpg" in skipped and "train/malignant/empty.jpg" in skipped
    assert json.loads((out / "config.json").read_text())["data"]["skipped_files"] == 2
