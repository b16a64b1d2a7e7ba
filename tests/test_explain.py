"""Grad-CAM explanations: a heatmap of the image's size that says something, and a PNG that decodes."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lesionlab.cli import app
from lesionlab.data.images import normalize, open_image, resize_to_input
from lesionlab.inference import loading
from lesionlab.inference.ensemble import EnsemblePredictor
from lesionlab.inference.explain import (
    Explainer,
    explain_image,
    explainable_dir,
    gradcam,
    overlay_png,
)
from lesionlab.inference.loading import load_predictor
from lesionlab.inference.predictor import TorchPredictor
from lesionlab.runs import RunError


@pytest.fixture(scope="module")
def lesion(small_data):
    return open_image(next((small_data / "test" / "malignant").iterdir()))


@pytest.fixture(scope="module")
def model_and_batch(tiny_run, small_data):
    predictor = TorchPredictor(tiny_run)
    files = (
        sorted((small_data / "test" / "benign").iterdir())[:1]
        + sorted((small_data / "test" / "malignant").iterdir())[:1]
    )
    batch = np.stack([resize_to_input(open_image(f), 224) for f in files])
    return predictor.model, torch.from_numpy(normalize(batch, predictor.info.mean, predictor.info.std))


def test_heatmap_has_the_image_size_and_shows_something(model_and_batch):
    model, x = model_and_batch
    maps = gradcam(model, x)
    assert maps.shape == (2, 224, 224) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for m in maps:
        assert m.std() > 0.01  # not constant


def test_heatmaps_are_per_image_and_target_dependent(model_and_batch):
    model, x = model_and_batch
    both = gradcam(model, x, "malignant")
    np.testing.assert_allclose(gradcam(model, x[1], "malignant"), both[1], atol=1e-5)  # no batch coupling
    assert not np.allclose(gradcam(model, x[:1], "benign")[0], both[0])
    with pytest.raises(ValueError, match="target"):
        gradcam(model, x, "everything")


def test_gradcam_explains_the_same_logit_the_model_outputs(model_and_batch):
    model, x = model_and_batch
    with torch.no_grad():
        split = model.head(model.backbone.forward_head(model.backbone.forward_features(x)))
        torch.testing.assert_close(split, model(x))
    assert all(p.grad is None for p in model.parameters())  # the shared model is left untouched


def test_overlay_png_decodes(tiny_run, lesion):
    png = overlay_png(tiny_run, lesion)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (224, 224) and img.mode == "RGB"
    e = explain_image(tiny_run, lesion)
    assert e.prediction.label in ("benign", "malignant", "not_a_lesion") and e.model_dir == tiny_run
    explainer = Explainer(tiny_run)
    assert explainer.network is explainer.answering  # one network loaded: it is drawn and it answers
    again = explainer.explain(lesion)
    assert again.prediction.probability == e.prediction.probability and again.target == e.target


def _operating_point(folder, threshold: float = 0.5) -> None:
    (folder / "calibration.json").write_text(
        json.dumps({"threshold": threshold, "temperature": 1.0, "policy": f"fixed:{threshold}", "tta": False})
    )


def test_ensembles_are_explained_by_their_first_member(tiny_run, tmp_path):
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": [str(tiny_run), "elsewhere"]}))
    with pytest.raises(RunError, match="no operating point"):  # "predicted" needs the validation threshold
        explainable_dir(tmp_path)
    _operating_point(tmp_path)
    assert explainable_dir(tmp_path) == tiny_run
    onnx_only = tmp_path / "onnx-only"
    onnx_only.mkdir()
    _operating_point(onnx_only)
    with pytest.raises(RunError, match="PyTorch checkpoint"):
        explainable_dir(onnx_only)


def test_an_ensemble_is_explained_for_its_own_answer(tiny_run, lesion, tmp_path):
    """The first member's network is drawn, for the label the ensemble gives, not the one the member gives."""
    member = explain_image(tiny_run, lesion)
    p = member.prediction.probability
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": [str(tiny_run), str(tiny_run)]}))
    flipped = (1 + p) / 2 if member.target == "malignant" else p / 2  # the twin ensemble says the opposite
    _operating_point(tmp_path, flipped)
    e = explain_image(tmp_path, lesion)
    assert e.prediction.probability == pytest.approx(p, abs=1e-6) and e.model_dir == tiny_run
    assert e.target == ("malignant" if p >= flipped else "benign") != member.target  # the ensemble's label


def test_explain_command_writes_a_png(tiny_run, small_data, tmp_path):
    img = next((small_data / "test" / "benign").iterdir())
    out = tmp_path / "cam.png"
    res = CliRunner().invoke(app, ["explain", "--model", str(tiny_run), str(img), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (224, 224) and "wrote" in res.output
    res = CliRunner().invoke(app, ["explain", "--model", str(tmp_path), str(img), "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def _counting_loads(monkeypatch) -> list[str]:
    """Every TorchPredictor built from now on (a member, a model, or the network an explainer draws)."""
    built: list[str] = []
    real = TorchPredictor.__init__

    def init(self, model_dir, *args, **kwargs):
        built.append(str(model_dir))
        real(self, model_dir, *args, **kwargs)

    monkeypatch.setattr(TorchPredictor, "__init__", init)
    return built


@pytest.fixture(scope="module")
def twin(tiny_run, tmp_path_factory):
    """Two copies of tiny_run as an evaluated ensemble folder (no training)."""
    import shutil

    root = tmp_path_factory.mktemp("twin")
    for name in ("a", "b"):
        shutil.copytree(tiny_run, root / name)
    (root / "ens").mkdir()
    (root / "ens" / "ensemble.json").write_text(json.dumps({"members": ["../a", "../b"]}))
    _operating_point(root / "ens")
    return root / "ens"


def test_an_explainer_reuses_the_served_predictor(twin, lesion, monkeypatch):
    served = load_predictor(twin)
    assert isinstance(served, EnsemblePredictor)
    built = _counting_loads(monkeypatch)
    explainer = Explainer(twin, served)
    assert built == [] and explainer.network is served.members[0] and explainer.answering is served
    e = explainer.explain(lesion)
    assert e.prediction.probability == pytest.approx(served.analyze([lesion])[0].probability, abs=1e-9)
    assert built == []


def test_two_explain_requests_on_an_ensemble_load_the_members_once(twin, small_data, monkeypatch):
    from fastapi.testclient import TestClient

    from lesionlab.serve import create_app

    built = _counting_loads(monkeypatch)
    loads: list[str] = []
    real_load = loading.load_predictor

    def counted_load(model_dir, *args, **kwargs):
        loads.append(str(model_dir))
        return real_load(model_dir, *args, **kwargs)

    monkeypatch.setattr(loading, "load_predictor", counted_load)
    with TestClient(create_app(twin)) as c:
        service = c.app.state.service  # type: ignore[attr-defined]
        service.load()  # the background load, awaited here
        assert service.ready, service.error
        at_start = list(built)
        assert len(at_start) == 2  # the two members, by the service
        accepted = next(  # a refused image answers 422 before any explanation is drawn
            f
            for f in sorted((small_data / "test" / "malignant").iterdir())
            if not service.predictor.analyze([open_image(f)])[0].refused
        )
        body = {"image": base64.b64encode(accepted.read_bytes()).decode()}
        for _ in range(2):
            r = c.post("/v1/predict?explain=true", json=body)
            assert r.status_code == 200, r.json()
            assert base64.b64decode(r.json()["explanation_png"]).startswith(b"\x89PNG")
    assert built == at_start  # the explainer drew the served first member: nothing reloaded per request
    assert len(loads) == 2  # the members, while the service loaded; none per request
