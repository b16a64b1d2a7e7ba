"""Operating threshold, temperature calibration and test-time augmentation, as evaluation and serving use them."""

import csv
import json
import shutil

import numpy as np
import pytest
from scipy.special import expit

from lesionlab.evaluation.evaluate import SplitScores, summarize
from lesionlab.evaluation.metrics import expected_calibration_error, point_metrics
from lesionlab.inference.predictor import ModelInfo, Predictor, tta_views


def _split(rng, n, scale):
    """Logits that are `scale` times too confident: true P = sigmoid(z / scale)."""
    y = rng.integers(0, 2, n)
    z_true = rng.normal(0, 1.5, n) + (2 * y - 1) * 1.0
    y = (rng.random(n) < expit(z_true)).astype(np.float32)
    return SplitScores([f"{i}.jpg" for i in range(n)], y, z_true * scale)


@pytest.fixture
def overconfident():
    rng = np.random.default_rng(0)
    return {"val": _split(rng, 3000, 3.0), "test": _split(rng, 3000, 3.0), "test_dedup": _split(rng, 1000, 3.0)}


def test_temperature_and_threshold_are_fitted_on_validation_only(overconfident):
    metrics, probs = summarize(overconfident, "sensitivity:0.9", n_resamples=20)
    t = metrics["calibration"]["temperature"]
    assert t == pytest.approx(3.0, rel=0.1)
    cal = metrics["calibration"]["test"]
    assert cal["ece_after"] < 0.03 < cal["ece_before"] and cal["brier_after"] < cal["brier_before"]
    val = overconfident["val"]
    assert point_metrics(val.y, probs["val"], metrics["threshold"]["value"])["recall"] >= 0.9
    # scrambling test changes neither the temperature nor the threshold
    scrambled = dict(overconfident, test=SplitScores(val.relpaths, val.y, -overconfident["test"].logits))
    again, _ = summarize(scrambled, "sensitivity:0.9", n_resamples=20)
    assert again["calibration"]["temperature"] == t and again["threshold"] == metrics["threshold"]


def test_evaluation_files_agree_with_each_other(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    cal = json.loads((tiny_run / "calibration.json").read_text())
    assert cal["temperature"] == m["calibration"]["temperature"] and cal["threshold"] == m["threshold"]["value"]
    with open(tiny_run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    z = np.array([float(r["logit"]) for r in rows])
    np.testing.assert_allclose([float(r["probability"]) for r in rows], expit(z / cal["temperature"]), atol=2e-6)
    test = [r for r in rows if r["split"] == "test"]
    ece = expected_calibration_error(
        np.array([int(r["label"]) for r in test]), np.array([float(r["probability"]) for r in test])
    )
    assert m["calibration"]["test"]["ece_after"] == pytest.approx(ece, abs=1e-4)
    assert (tiny_run / "figures" / "reliability.png").stat().st_size > 1000


def test_tta_views_are_the_eight_symmetries_of_the_square():
    img = np.random.default_rng(0).integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
    views = tta_views(img)
    assert len(views) == 8 and len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[0], img)
    for v in tta_views(np.rot90(img, 1, axes=(1, 2)).copy()):  # a rotated input gives the same set of views
        assert any(np.array_equal(v, w) for w in views)


class CornerPredictor(Predictor):
    """A stand-in network whose logit is the mean of the top-left quadrant: orientation-sensitive on purpose."""

    def __init__(self):
        self.info = ModelInfo("stub", "stub", 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), temperature=2.0)

    def _forward(self, x):
        return x[:, :, :4, :4].mean(axis=(1, 2, 3)), x.mean(axis=(2, 3))


def test_tta_logit_is_the_mean_over_views():
    p = CornerPredictor()
    batch = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    expected = np.mean([p.logits_from_uint8(v) for v in tta_views(batch)], axis=0)
    np.testing.assert_allclose(p.logits_from_uint8(batch, tta=True), expected)
    assert not np.allclose(p.logits_from_uint8(batch), expected)
    turned = np.ascontiguousarray(np.rot90(batch, 1, axes=(1, 2)))
    np.testing.assert_allclose(p.logits_from_uint8(turned, tta=True), expected, atol=1e-6)  # orientation-free


def test_analyze_applies_tta_and_temperature():
    from PIL import Image

    p = CornerPredictor()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(2)]
    plain, tta = p.analyze(images), p.analyze(images, tta=True)
    np.testing.assert_allclose([r.logit for r in tta], p.predict_logits(images, tta=True))
    np.testing.assert_allclose([r.probability for r in plain], expit(p.predict_logits(images) / 2.0))
    assert [r.logit for r in plain] != [r.logit for r in tta]


def test_evaluate_with_tta_records_it(tiny_run, tmp_path, monkeypatch):
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.inference import predictor

    monkeypatch.setattr(predictor, "tta_views", lambda b: tta_views(b)[:2])  # 2 of the 8 views: the wiring, fast
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    m = evaluate_run(run, tta=True, n_resamples=50, progress=False)
    assert m["tta"] is True and json.loads((run / "calibration.json").read_text())["tta"] is True
    plain = json.loads((tiny_run / "metrics.json").read_text())
    assert m["test"]["n"] == plain["test"]["n"] and m["test"]["auc"]["value"] > 0.5
