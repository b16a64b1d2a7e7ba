"""--device and --precision: which device and arithmetic a run gets, what config.json records, and (where a CUDA GPU
exists) the CUDA path end to end. Without a GPU, torch.cuda is monkeypatched to test the choices."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lesionlab import runs
from lesionlab.models.classifier import load_model
from lesionlab.runs import RunFolder
from lesionlab.training import config as train_config
from lesionlab.training import record
from lesionlab.training.config import ConfigError, TrainConfig
from lesionlab.training.device import Compute, RunningMeans, resolve_device
from lesionlab.training.loop import train


def _gpus(monkeypatch, n: int, bf16: bool = True) -> None:
    """torch.cuda as on a machine with ``n`` GPUs (none: no CUDA), whose GPUs do or do not compute bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(train_config, "cuda_bf16_supported", lambda: n > 0 and bf16)


def test_auto_is_the_cpu_without_a_gpu_and_cuda_with_one(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)  # recorded as cuda:0
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_missing_device_is_a_clear_error(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"cuda requested but torch\.cuda\.is_available\(\) is False"):
        resolve_device("cuda")
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"cuda:3 requested but only 1 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"mps requested but torch\.backends\.mps\.is_available\(\) is False"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "CPU", "cuda:", "cuda:-1", "cuda0", "tpu", "cpu:0", ""])
def test_a_bad_device_string_is_refused_when_the_config_is_built(spec):
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        TrainConfig(device=spec)


def test_a_gpu_config_is_built_without_a_gpu(monkeypatch):
    """A config naming a GPU is read (and its run evaluated) on a CPU-only machine; only training needs the GPU."""
    _gpus(monkeypatch, 0)
    cfg = TrainConfig(mode="finetune", device="cuda:0", precision="fp16")
    with pytest.raises(ConfigError, match="is_available"):
        Compute.of(cfg)


def test_precision_auto_per_device(monkeypatch):
    _gpus(monkeypatch, 1, bf16=True)
    assert TrainConfig(mode="finetune").precision == "bf16"  # auto -> the GPU, which has bf16
    assert TrainConfig(mode="finetune", device="cuda").precision == "bf16"
    assert TrainConfig(mode="frozen", device="cuda").precision == "fp32"  # the head trains on fp32 features
    _gpus(monkeypatch, 1, bf16=False)
    assert TrainConfig(mode="finetune", device="cuda").precision == "fp16"  # with a gradient scaler
    assert TrainConfig(mode="finetune", device="cuda", precision="fp32").precision == "fp32"
    monkeypatch.setattr(train_config, "bf16_supported", lambda: False)
    assert TrainConfig(mode="finetune", device="cpu").precision == "fp32"  # the CPU as before
    assert TrainConfig(mode="finetune", device="mps").precision == "fp32"
    monkeypatch.setattr(train_config, "bf16_supported", lambda: True)
    assert TrainConfig(mode="finetune", device="cpu").precision == "bf16"


def test_fp16_is_cuda_only(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="precision fp16 needs a CUDA device"):
        TrainConfig(mode="finetune", precision="fp16")  # auto -> the CPU here
    with pytest.raises(ConfigError, match="precision fp16 needs a CUDA device"):
        TrainConfig(mode="finetune", device="cpu", precision="fp16")
    assert TrainConfig(mode="finetune", device="cuda", precision="fp16").precision == "fp16"


def test_the_cpu_path_moves_nothing():
    compute = Compute.of(TrainConfig(device="cpu"))
    x, y = torch.zeros(2, 3), torch.ones(2)
    moved = compute.move(x, y, None)
    assert moved[0] is x and moved[1] is y and moved[2] is None
    assert compute.grad_scaler() is None and compute.record()["device"] == "cpu"


def test_the_gpu_running_means_equal_the_cpus():
    """On a GPU the epoch's sums stay on the device (no sync per step): the same numbers as the CPU's floats."""
    g = torch.Generator().manual_seed(0)
    eager, lazy = RunningMeans(torch.device("cpu")), RunningMeans(torch.device("cpu"), lazy=True)
    for n in (4, 4, 3):
        loss, logits, y = torch.rand((), generator=g), torch.randn(n, generator=g), (torch.rand(n, generator=g) > 0.5)
        for m in (eager, lazy):
            m.add(loss, logits, y.float())
    assert eager.means() == lazy.means() and eager.running_loss() is not None and lazy.running_loss() is None


def test_the_loop_with_the_gpus_bookkeeping_gives_the_cpus_history(monkeypatch):
    import numpy as np

    from lesionlab.training import loop
    from lesionlab.training.sources import FeatureSource

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    cfg = TrainConfig(epochs=2, batch_size=8)

    def history() -> list:
        epochs = loop.train_epochs(FeatureSource(x, y, x, y, rescore_train=False), cfg, progress=False)
        return [{k: v for k, v in e.result.row().items() if k != "seconds"} for e in epochs]

    eager = history()
    monkeypatch.setattr(loop, "RunningMeans", lambda device: RunningMeans(device, lazy=True))
    assert history() == eager


def test_a_run_records_its_device_precision_and_throughput(few_images, tmp_path):
    out = train(TrainConfig(epochs=2, batch_size=4), few_images, tmp_path / "r", progress=False)
    config = json.loads((out / "config.json").read_text())
    compute = config["compute"]
    assert config["train"]["device"] == "auto"  # as asked; the resolved device is compute's
    assert compute["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert compute["precision"] == config["train"]["precision"] == "fp32"
    assert compute["images_trained"] == 2 * config["data"]["n_train"]
    assert compute["images_per_second"] > 0 and compute["cpu_threads"] == torch.get_num_threads()
    assert compute["device_name"]


def test_device_and_log_are_recorded_but_not_part_of_the_identity(few_images, tmp_path):
    out = train(TrainConfig(epochs=1, device="cpu"), few_images, tmp_path / "r", progress=False)
    before = (out / "model.pt").stat().st_mtime_ns
    assert train(TrainConfig(epochs=1, device="auto", log="tensorboard"), few_images, out, progress=False) == out
    assert (out / "model.pt").stat().st_mtime_ns == before  # finished: the same run, nothing retrained
    assert not (out / "tensorboard").exists()
    assert record.config_from_run(out).device == "cpu"


def test_a_run_moved_to_a_device_with_another_auto_precision_is_told_how_to_resume(few_images, tmp_path):
    out = train(TrainConfig(epochs=1), few_images, tmp_path / "r", progress=False)
    with pytest.raises(runs.RunError, match=r"settings differ: precision\).*pass --precision fp32"):
        train(TrainConfig(epochs=1, precision="bf16"), few_images, out, progress=False)


def test_runs_from_before_devices_read_back_as_cpu_runs():
    old = {"schema_version": 3, "train": {"backbone": "efficientnet_lite0", "mode": "frozen", "precision": "fp32"}}
    train = runs.migrate(old)["train"]
    assert (train["device"], train["log"], train["log_uri"]) == ("cpu", "none", "")


# ------------------------------------------------------------------ the CUDA path, where a GPU exists


@pytest.fixture
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip(
            "needs a CUDA GPU: torch.cuda.is_available() is False on this machine (the CUDA path is tested where "
            "one exists; the choices it makes are tested above with torch.cuda monkeypatched)"
        )


def _dies_at_epoch(monkeypatch, epoch: int):
    real = RunFolder.write_history

    def dies(run, rows, fields):
        if len(rows) == epoch:
            raise KeyboardInterrupt
        real(run, rows, fields)

    monkeypatch.setattr(RunFolder, "write_history", dies)
    return real


def test_finetune_on_cuda_then_resume_evaluate_and_predict_on_the_cpu(
    cuda, few_images, shared_weights, tmp_path, monkeypatch
):
    from PIL import Image

    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.inference.loading import load_predictor

    cfg = TrainConfig(backbone="mobilenetv2", mode="finetune", epochs=2, batch_size=4, device="cuda", ema_decay=0.9)
    assert cfg.precision in ("bf16", "fp16")
    out = train(cfg, few_images, tmp_path / "gpu", weights_dir=shared_weights, progress=False)
    compute = json.loads((out / "config.json").read_text())["compute"]
    assert compute["device"].startswith("cuda:") and compute["precision"] == cfg.precision
    assert compute["grad_scaler"] == (cfg.precision == "fp16") and compute["images_per_second"] > 0
    state = torch.load(out / "model.pt", weights_only=True)  # no map_location: saved as CPU tensors
    assert all(v.device.type == "cpu" for v in state["state_dict"].values())
    evaluate_run(out, n_resamples=50, progress=False)  # on the CPU
    with Image.open(next((few_images / "test" / "benign").iterdir())) as image:
        probs = load_predictor(out).predict_proba([image.convert("RGB")])
    assert 0.0 <= float(probs[0]) <= 1.0

    # killed after epoch 1 on the GPU, resumed on the CPU (fp32: the precision both devices compute)
    moved = TrainConfig(backbone="mobilenetv2", mode="finetune", epochs=2, batch_size=4, precision="fp32")
    real = _dies_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(moved, few_images, tmp_path / "moved", weights_dir=shared_weights, progress=False)
    monkeypatch.setattr(RunFolder, "write_history", real)
    on_cpu = dataclasses.replace(moved, device="cpu")
    resumed = train(on_cpu, few_images, tmp_path / "moved", weights_dir=shared_weights, progress=False)
    config = json.loads((resumed / "config.json").read_text())
    assert config["compute"]["device"] == "cpu" and config["compute"]["images_trained"] == config["data"]["n_train"]
    assert len(RunFolder(resumed).history()) == 2 and not (resumed / "train_state.pt").exists()


def test_fp16_with_a_gradient_scaler_and_a_frozen_head_on_cuda(cuda, few_images, shared_weights, tmp_path):
    cfg = TrainConfig(backbone="mobilenetv2", mode="finetune", epochs=1, batch_size=4, device="cuda", precision="fp16")
    out = train(cfg, few_images, tmp_path / "fp16", weights_dir=shared_weights, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["compute"]["grad_scaler"] is True
    assert math.isfinite(float(RunFolder(out).history()[0]["train_loss"]))

    # frozen: the head on the GPU, on the same cached features, in fp32: the CPU's numbers up to rounding
    cpu = train(TrainConfig(epochs=2, device="cpu", class_weight=True), few_images, tmp_path / "cpu", progress=False)
    gpu = train(TrainConfig(epochs=2, device="cuda", class_weight=True), few_images, tmp_path / "gpu", progress=False)
    for a, b in zip(RunFolder(cpu).history(), RunFolder(gpu).history()):
        for column in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-3, abs=1e-4), column
    model, _ = load_model(gpu / "model.pt")
    assert next(model.parameters()).device.type == "cpu"
