"""The one Predictor contract: images in, calibrated P(malignant) out, over one forward path and one batching helper.

Models, ensembles (whose members may read different input sizes), the Lambda handler and the CLI all answer
through it, with TTA as the model's operating point was fitted unless a caller says otherwise.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy.special import expit
from typer.testing import CliRunner

from lesionlab.data.images import normalize, open_image
from lesionlab.errors import LesionlabError
from lesionlab.inference import predictor as predictor_module
from lesionlab.inference.ensemble import EnsemblePredictor, mean_probability_logit
from lesionlab.inference.loading import load_predictor
from lesionlab.inference.predictor import ModelInfo, Predictor, TorchPredictor, tta_views
from lesionlab.models.batching import map_batches

# ------------------------------------------------------------------ the batching helper


def test_map_batches_concatenates_arrays_in_order():
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    seen: list[int] = []

    def fn(b: np.ndarray) -> np.ndarray:
        seen.append(len(b))
        return b.sum(axis=1)

    out = map_batches(fn, x, 4)
    assert seen == [4, 4, 2]
    np.testing.assert_array_equal(out, x.sum(axis=1))


def test_map_batches_handles_tuples_with_absent_outputs():
    x = np.arange(5, dtype=np.float64)
    logits, feats, nothing = map_batches(lambda b: (b * 2, np.stack([b, b], 1), None), x, 2)
    np.testing.assert_array_equal(logits, x * 2)
    assert feats.shape == (5, 2) and nothing is None  # a runtime without a features output: None, not an error


def test_map_batches_on_empty_input():
    calls: list[tuple] = []

    def fn(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(b.shape)
        return b.sum(1), b

    empty = np.zeros((0, 3), np.float32)
    out = map_batches(fn, empty, 8)  # fn sees the empty slice once
    assert calls == [(0, 3)] and out[0].shape == (0,) and out[1].shape == (0, 3)
    calls.clear()
    given = map_batches(fn, empty, 8, empty=(np.zeros(0), empty))  # fn not called at all
    assert calls == [] and given[0].shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        map_batches(lambda b: b, empty, 0)


def test_map_batches_reports_progress_per_batch():
    ticks = []

    def progress(starts):
        for s in starts:
            ticks.append(s)
            yield s

    map_batches(lambda b: b, np.zeros(7), 3, progress=progress)
    assert ticks == [0, 3, 6]


class CountingStub(Predictor):
    """A stand-in network (logit: the top-left quadrant's mean, orientation-sensitive) that counts its passes."""

    def __init__(self, size: int = 8, batch_size: int = 32):
        self.info = ModelInfo("stub", "stub", size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), temperature=2.0)
        self.batch_size = batch_size
        self.passes: list[int] = []

    def _forward(self, x):
        self.passes.append(len(x))
        return x[:, :, :4, :4].mean(axis=(1, 2, 3)), x.mean(axis=(2, 3))


def _stub_images(n: int, size: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_predictor_batches_through_the_helper():
    p = CountingStub(batch_size=2)
    images = _stub_images(5)
    z = p.logits_from_uint8(p.prepare(images))
    assert p.passes == [2, 2, 1] and z.shape == (5,) and z.dtype == np.float64
    assert p.logits_from_uint8(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0,)
    assert p.predict_proba([]).shape == (0,) and p.analyze([]) == []


def test_predict_proba_is_the_contract_and_the_old_names_are_aliases():
    p = CountingStub()
    images = _stub_images(3)
    proba = p.predict_proba(images)
    np.testing.assert_allclose(proba, expit(p.predict_logits(images) / 2.0))
    np.testing.assert_array_equal(p.predict(images), proba)
    np.testing.assert_allclose([r.probability for r in p.analyze(images)], proba)
    np.testing.assert_allclose(p.predict_proba(images, tta=True), [r.probability for r in p.analyze(images, tta=True)])


def test_a_uint8_batch_at_another_size_is_resized_for_the_model():
    p = CountingStub(size=8)
    batch = np.stack([np.asarray(im) for im in _stub_images(2, size=12)])
    prepared = p.prepare(batch)
    assert prepared.shape == (2, 8, 8, 3) and prepared.dtype == np.uint8
    assert p.prepare(prepared) is prepared  # already at the input size: passed through untouched
    np.testing.assert_allclose(p.logits_from_uint8(batch), p.logits_from_uint8(prepared))


# ------------------------------------------------------------------ TTA: 8 forward passes, features included


@pytest.fixture(scope="module")
def lesions(small_data) -> list[Image.Image]:
    files = (
        sorted((small_data / "test" / "malignant").iterdir())[:1]
        + sorted((small_data / "test" / "benign").iterdir())[:1]
    )
    return [open_image(f) for f in files]


def _count_passes(monkeypatch, p) -> list[int]:
    calls: list[int] = []
    real = p._forward

    def counted(x):
        calls.append(len(x))
        return real(x)

    monkeypatch.setattr(p, "_forward", counted)
    return calls


def test_analyze_with_tta_costs_eight_forward_passes(tiny_run, lesions, monkeypatch):
    p = TorchPredictor(tiny_run)
    assert p.detector is not None  # the identity view's features must feed it
    batch = p.prepare(lesions)
    # the answer as it was computed before: one pass for the features, then the 8 views
    _, feats = p._forward(normalize(batch, p.info.mean, p.info.std))
    assert feats is not None
    views = [p._forward(normalize(v, p.info.mean, p.info.std))[0].astype(np.float64) for v in tta_views(batch)]
    expected_tta = expit(np.mean(views, axis=0) / p.info.temperature)
    expected_plain = expit(views[0] / p.info.temperature)
    expected_ood = p.detector.score(feats, batch)

    calls = _count_passes(monkeypatch, p)
    tta = p.analyze(lesions, tta=True)
    assert len(calls) == 8
    calls.clear()
    plain = p.analyze(lesions, tta=False)
    assert len(calls) == 1
    np.testing.assert_allclose([r.probability for r in tta], expected_tta, atol=1e-6)
    np.testing.assert_allclose([r.probability for r in plain], expected_plain, atol=1e-6)
    np.testing.assert_allclose([float(r.ood_score or 0) for r in tta], expected_ood, rtol=1e-6)
    np.testing.assert_allclose([float(r.ood_score or 0) for r in plain], expected_ood, rtol=1e-6)


# ------------------------------------------------------------------ ensembles stand in for a model


@pytest.fixture(scope="module")
def mixed_ensemble(tiny_run, tmp_path_factory) -> Path:
    """tiny_run (224 px) and a copy reading 240 px inputs, as mobilenetv2 + efficientnet_lite1 would: the network is
    fully convolutional with global pooling, so only the preprocessing differs (no training needed)."""
    root = tmp_path_factory.mktemp("mixed-ensemble")
    for name in ("a", "b"):
        shutil.copytree(tiny_run, root / name)
    cfg_path = root / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocessing"]["input_size"] = 240
    cfg["preprocessing"]["mean"] = [0.485, 0.456, 0.406]
    cfg["preprocessing"]["std"] = [0.229, 0.224, 0.225]
    cfg_path.write_text(json.dumps(cfg))
    (root / "ens").mkdir()
    (root / "ens" / "ensemble.json").write_text(json.dumps({"members": ["../a", "../b"]}))
    (root / "ens" / "calibration.json").write_text(
        json.dumps({"threshold": 0.5, "temperature": 1.0, "policy": "fixed:0.5", "tta": False})
    )
    return root / "ens"


def test_an_ensemble_of_different_input_sizes_stands_in_for_a_model(mixed_ensemble, lesions):
    p = load_predictor(mixed_ensemble)
    assert isinstance(p, EnsemblePredictor)
    a, b = p.members
    assert [m.input_size for m in p.info.members] == [224, 240]
    assert p.info.members[1].mean == (0.485, 0.456, 0.406)
    assert [d["input_size"] for d in p.info.preprocessing] == [224, 240]
    batch = p.prepare(lesions)  # the ensemble's uint8 input: at its largest member's size, so none upsamples
    assert batch.shape == (2, 240, 240, 3)
    z = p.logits_from_uint8(batch)  # raised TypeError before
    expected = mean_probability_logit(
        [expit(m.logits_from_uint8(m.prepare(batch)) / m.info.temperature) for m in (a, b)]
    )
    np.testing.assert_allclose(z, expected, atol=1e-9)
    proba = p.predict_proba(lesions)  # PIL images: each member prepares its own input from the original
    np.testing.assert_allclose(
        proba, expit(mean_probability_logit([a.predict_proba(lesions), b.predict_proba(lesions)])), atol=1e-9
    )
    np.testing.assert_allclose([r.probability for r in p.analyze(lesions)], proba, atol=1e-9)


def test_ensemble_tta_feeds_each_members_detector_from_its_identity_view(mixed_ensemble, lesions, monkeypatch):
    p = load_predictor(mixed_ensemble)
    assert isinstance(p, EnsemblePredictor)
    per_member = [_count_passes(monkeypatch, m) for m in p.members]
    p.analyze(lesions[:1], tta=True)
    assert [len(c) for c in per_member] == [8, 8]


def test_v1_model_reports_each_members_preprocessing(mixed_ensemble, onnx_run):
    from lesionlab.serve import create_app

    with TestClient(create_app(mixed_ensemble)) as c:
        card = _ready_card(c)
    assert card["input_size"] is None and card["mean"] is None and card["std"] is None  # no single answer
    pre = card["preprocessing"]
    assert [(d["input_size"], d["mean"]) for d in pre] == [(224, [0.5] * 3), (240, [0.485, 0.456, 0.406])]
    assert all(d["backbone"] == "efficientnet_lite0" for d in pre)
    with TestClient(create_app(onnx_run)) as c:
        card = _ready_card(c)
    assert card["input_size"] == 224 and card["mean"] == [0.5] * 3
    assert card["preprocessing"] == [
        {"model_id": card["model_id"], "backbone": "efficientnet_lite0", "input_size": 224, "mean": [0.5] * 3,
         "std": [0.5] * 3, "resize": "shorter-side-bicubic+center-crop", "color_constancy": "none"}
    ]  # fmt: skip


def _ready_card(c: TestClient) -> dict:
    import time

    deadline = time.monotonic() + 60
    while c.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, c.get("/health/ready").json()
        time.sleep(0.05)
    return c.get("/v1/model").json()


# ------------------------------------------------------------------ TTA as fitted: Lambda and CLI


@pytest.fixture(scope="module")
def tta_model(onnx_run, tmp_path_factory) -> Path:
    """onnx_run whose operating point was fitted on TTA scores (calibration.json says tta: true)."""
    folder = tmp_path_factory.mktemp("tta-model") / "model"
    shutil.copytree(onnx_run, folder)
    cal = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration.json").write_text(json.dumps(cal | {"tta": True}))
    return folder


@pytest.fixture(scope="module")
def lesion_file(small_data) -> Path:
    return sorted((small_data / "test" / "malignant").iterdir())[0]


def test_lambda_handler_follows_the_fitted_tta(tta_model, lesion_file, monkeypatch):
    from lesionlab.serve import aws_lambda

    monkeypatch.setenv("LESIONLAB_MODEL", str(tta_model))
    monkeypatch.setattr(aws_lambda, "_loaded", None)  # restored after the test
    monkeypatch.setattr(aws_lambda, "limit_blas_threads", lambda: None)  # process-wide; not inside pytest
    service, _ = aws_lambda._get_service()
    assert service.error is None and service.predictor is not None and service.predictor.info.tta is True
    reference = load_predictor(tta_model)
    image = open_image(lesion_file)
    with_tta, without = (reference.analyze([image], tta=t)[0].probability for t in (True, False))
    assert with_tta != pytest.approx(without, abs=1e-9)  # else this test could not tell them apart
    calls = _count_passes(monkeypatch, service.predictor)
    event = {"body": json.dumps({"image": base64.b64encode(lesion_file.read_bytes()).decode()})}
    out = aws_lambda.handler(event, None)
    body = json.loads(out["body"])
    assert out["statusCode"] == 200 and len(calls) == 8
    assert body["probability"] == pytest.approx(with_tta, abs=1e-9)


def test_cli_predict_follows_the_fitted_tta(tta_model, lesion_file):
    from lesionlab.cli import app

    reference = load_predictor(tta_model)
    image = open_image(lesion_file)
    for flags, tta in (([], True), (["--no-tta"], False), (["--tta"], True)):
        res = CliRunner().invoke(app, ["predict", "--model", str(tta_model), "--json", *flags, str(lesion_file)])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)[0]["probability"]
        assert got == pytest.approx(round(reference.analyze([image], tta=tta)[0].probability, 6), abs=1e-9), flags


# ------------------------------------------------------------------ ONNX: one session set-up, one batching loop


def test_one_onnx_session_set_up(onnx_run):
    from lesionlab.inference import export

    assert not hasattr(export, "_onnx_session")
    assert export.onnx_session is predictor_module.onnx_session  # export's parity check runs what serving runs
    served = predictor_module.OnnxPredictor(onnx_run, num_threads=1).session.get_session_options()
    checked = export.onnx_session(onnx_run / "model.onnx", 1).get_session_options()
    assert served.graph_optimization_level == checked.graph_optimization_level
    assert served.intra_op_num_threads == checked.intra_op_num_threads == 1


class FakeSession:
    def __init__(self):
        self.batches: list[int] = []

    def get_inputs(self):
        return [type("Input", (), {"name": "input"})()]

    def run(self, names, feed):
        x = feed["input"]
        self.batches.append(len(x))
        return [x.mean(axis=(1, 2, 3)), x.mean(axis=(2, 3))][: len(names) if names else 2]


def test_onnx_logits_batches_through_the_helper():
    from lesionlab.inference.export import onnx_logits

    session = FakeSession()
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    z = onnx_logits(session, x, batch=2)
    assert session.batches == [2, 2, 1] and z.dtype == np.float64
    np.testing.assert_allclose(z, x.mean(axis=(1, 2, 3)), rtol=1e-6)
    assert onnx_logits(session, x[:0]).shape == (0,)  # raised on np.concatenate([]) before


# ------------------------------------------------------------------ loading


def test_unknown_backend_is_a_lesionlab_error(tiny_run):
    with pytest.raises(LesionlabError, match="backend must be one of"):
        load_predictor(tiny_run, "onxx")
