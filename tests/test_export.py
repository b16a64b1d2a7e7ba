"""ONNX export: files, parity with PyTorch, loud failure, and the int8 keep-or-discard rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.cli import app
from lesionlab.data.images import open_image
from lesionlab.inference import export as ex
from lesionlab.inference.loading import load_predictor


def _quiet(_: str) -> None:
    pass


@pytest.fixture
def run_copy(onnx_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(onnx_run, dst)
    return dst


def test_export_writes_model_and_preprocess(onnx_run):
    import onnxruntime as ort

    spec = files.read_json(onnx_run / "preprocess.json")
    cal = files.read_json(onnx_run / rf.CALIBRATION)
    assert spec["threshold"] == cal["threshold"] and spec["temperature"] == cal["temperature"]
    assert spec["input_size"] == 224 and spec["mean"] == [0.5] * 3 and spec["std"] == [0.5] * 3
    assert spec["output_names"] == ["logit", "features"] and spec["opset"] >= 17
    assert spec["backbone"] == "efficientnet_lite0" and "center-crop" in spec["resize"]
    session = ort.InferenceSession(str(onnx_run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logit", "features"]
    for n in (1, 3):  # dynamic batch axis
        logit, feats = session.run(None, {"input": np.zeros((n, 3, 224, 224), np.float32)})
        assert logit.shape == (n,) and feats.shape[0] == n


def test_onnx_predictor_matches_torch(onnx_run, small_data):
    images = [open_image(p) for p in sorted((small_data / "test" / "malignant").iterdir())[:4]]
    p_onnx = load_predictor(onnx_run, "onnx").predict(images)
    p_torch = load_predictor(onnx_run, "torch").predict(images)
    assert np.max(np.abs(p_onnx - p_torch)) <= ex.PARITY_TOLERANCE


def test_parity_uses_validation_images(onnx_run):
    config = rf.RunFolder(onnx_run).config
    images, source = ex.parity_batch(onnx_run, config, 224, None)
    assert source == "validation" and images.shape[1:] == (224, 224, 3) and len(images) >= 1


def test_parity_falls_back_to_generated_images(onnx_run, tmp_path):
    config = rf.RunFolder(onnx_run).config
    images, source = ex.parity_batch(onnx_run, config, 224, tmp_path / "no-such-data")
    assert source == "generated" and images.shape == (32, 224, 224, 3)


def test_parity_failure_is_loud_and_leaves_nothing(run_copy, monkeypatch):
    exported = (run_copy / "model.onnx").read_bytes()
    for name in ("model.onnx", "preprocess.json"):
        (run_copy / name).unlink()
    monkeypatch.setattr(ex, "_torch_to_onnx", lambda module, size, path, opset: Path(path).write_bytes(exported))
    monkeypatch.setattr(ex, "check_parity", lambda *a, **k: 3e-3)
    with pytest.raises(ex.ExportError, match="disagrees with PyTorch"):
        ex.export_run(run_copy, log=_quiet)
    assert not (run_copy / "model.onnx").exists() and not (run_copy / "preprocess.json").exists()
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


def test_export_needs_an_evaluated_run(run_copy):
    (run_copy / rf.CALIBRATION).unlink()
    result = CliRunner().invoke(app, ["export", str(run_copy)])
    assert result.exit_code == 2 and "lesionlab evaluate" in result.output


def test_export_cli_rejects_unknown_quantization(run_copy):
    result = CliRunner().invoke(app, ["export", str(run_copy), "--quantize", "fp16"])
    assert result.exit_code == 2 and "int8" in result.output


def test_int8_is_kept_only_within_the_auc_margin(run_copy, monkeypatch):
    messages: list[str] = []
    with monkeypatch.context() as m:  # a "quantizer" that changes nothing: same AUC, so kept
        m.setattr(ex, "_quantize", lambda src, dst, calib: shutil.copy(src, dst))
        kept = ex.quantize_run(run_copy, log=messages.append)
    assert kept.kept and (run_copy / rf.INT8).exists() and kept.auc_int8 == kept.auc_float
    monkeypatch.setattr(ex, "MAX_AUC_DROP", -1.0)  # real quantization; nothing is within a negative margin
    dropped = ex.quantize_run(run_copy, log=messages.append)
    assert not dropped.kept and not (run_copy / rf.INT8).exists()  # the stale int8 file went too
    assert "kept model.int8.onnx" in messages[0] and "discarded" in messages[1]
    assert f"{dropped.auc_int8:.4f}" in messages[1] and f"{dropped.auc_float:.4f}" in messages[1]
    report = json.loads((run_copy / rf.QUANTIZATION).read_text())
    assert report["kept"] is False and report["n_test"] == 24 and 0 <= report["auc_int8"] <= 1
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".int8-")]


def test_a_folder_with_only_the_exported_model_keeps_its_operating_point(onnx_run, tmp_path):
    """model.onnx + preprocess.json is what other runtimes get; lesionlab reads the same operating point."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.onnx", "preprocess.json"):
        shutil.copy(onnx_run / name, bare / name)
    info, full = load_predictor(bare).info, load_predictor(onnx_run, "onnx").info
    assert (info.threshold, info.temperature, info.model_id, info.tta) == (
        full.threshold,
        full.temperature,
        full.model_id,
        full.tta,
    )
    assert info.threshold != 0.5


def test_re_evaluating_refreshes_the_exported_operating_point(run_copy):
    from lesionlab.evaluation.evaluate import evaluate_run

    evaluate_run(run_copy, policy="fixed:0.42", n_resamples=20, progress=False)
    spec = files.read_json(run_copy / "preprocess.json")
    assert spec["threshold"] == 0.42 and spec["threshold_policy"] == "fixed:0.42" and spec["tta"] is False
    assert spec["temperature"] == files.read_json(run_copy / rf.CALIBRATION)["temperature"]


def test_a_model_without_an_operating_point_is_not_loaded(run_copy):
    (run_copy / rf.CALIBRATION).unlink()
    (run_copy / "preprocess.json").unlink()
    with pytest.raises(rf.RunError, match="no operating point"):
        load_predictor(run_copy)
    res = CliRunner().invoke(app, ["predict", "--model", str(run_copy), __file__])
    assert res.exit_code == 2 and "lesionlab evaluate" in res.output
    with pytest.raises(ValueError, match="backend must be one of"):
        load_predictor(run_copy, "onxx")


def test_predictions_use_tta_as_the_threshold_was_fitted(run_copy, small_data, monkeypatch):
    cal = files.read_json(run_copy / rf.CALIBRATION)
    files.atomic_write_json(run_copy / rf.CALIBRATION, cal | {"tta": True})
    predictor = load_predictor(run_copy, "onnx")
    calls = []
    real = predictor.logits_from_uint8

    def recording(b, tta=False):
        calls.append(tta)
        return real(b, tta)

    monkeypatch.setattr(predictor, "logits_from_uint8", recording)
    image = open_image(sorted((small_data / "test" / "benign").iterdir())[0])
    assert predictor.info.tta is True
    assert predictor.predict([image])[0] == pytest.approx(predictor.predict([image], tta=True)[0])
    assert calls.count(True) == 2  # (each TTA call scores its 8 views through the same method, tta=False)
    calls.clear()
    predictor.predict([image], tta=False)
    assert calls == [False]
