"""The service in-process: contract, hardening (limits, bad inputs, auth), Lambda handler, Dockerfile, CLI wiring."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import modules_imported
from lesionlab.evaluation.report import DISCLAIMER
from lesionlab.inference.predictor import Prediction
from lesionlab.serve import aws_lambda, create_app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_only(onnx_run, tmp_path_factory) -> Path:
    """The shape of the bundled default model: ONNX and JSON files, no PyTorch checkpoint."""
    out = tmp_path_factory.mktemp("onnx-only")
    for name in ("model.onnx", "preprocess.json", "calibration.json", "config.json", "metrics.json"):
        shutil.copy(onnx_run / name, out / name)
    (out / "MODEL_CARD.md").write_text("# test model card\n")
    return out


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health/ready").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(onnx_run):
    with TestClient(create_app(onnx_run)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def lesion_jpeg(small_data) -> bytes:
    return sorted((small_data / "test" / "malignant").iterdir())[0].read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def refusing(monkeypatch, client) -> None:
    """Makes the loaded predictor refuse every image, as the lesion detector does for a non-lesion."""
    predictor = client.app.state.service.predictor

    def analyze(images, tta=False):
        return [
            Prediction(
                0.3,
                "not_a_lesion",
                predictor.info.threshold,
                -0.8,
                True,
                99.0,
                "does not look like a dermoscopic lesion image (distance 99.0 > 40.0)",
            )
            for _ in images
        ]

    monkeypatch.setattr(predictor, "analyze", analyze)


# ------------------------------------------------------------------ study contract: POST /predict


def test_study_contract_json(client, lesion_jpeg):
    r = client.post("/predict", json={"image": b64(lesion_jpeg)})
    env = r.json()
    assert r.status_code == env["statusCode"] == 200
    assert env["headers"] == {"Content-Type": "application/json"}
    body = env["body"]
    assert body["predicted_label"] in ("benign", "malignant") and 0 <= body["probability"] <= 1
    assert body["predicted_label"] == ("malignant" if body["probability"] >= body["threshold"] else "benign")
    assert body["disclaimer"] == DISCLAIMER


@pytest.mark.parametrize("shape", ["bare", "json-string", "data-uri", "urlsafe-unpadded", "line-wrapped"])
def test_study_contract_body_shapes(client, lesion_jpeg, shape):
    expected = client.post("/predict", json={"image": b64(lesion_jpeg)}).json()["body"]["probability"]
    text = b64(lesion_jpeg)
    content = {
        "bare": text,
        "json-string": json.dumps(text),
        "data-uri": json.dumps({"image": "data:image/jpeg;base64," + text}),
        "urlsafe-unpadded": base64.urlsafe_b64encode(lesion_jpeg).decode().rstrip("="),
        "line-wrapped": "\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
    }[shape]
    r = client.post("/predict", content=content, headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.json()
    assert r.json()["body"]["probability"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "key,status,code",
    [
        ("text", 415, "unsupported_image"),
        ("tiny", 422, "image_too_small"),
        ("huge", 413, "image_too_large"),
        ("truncated", 415, "unsupported_image"),
        ("zero", 400, "empty_image"),
    ],
)
def test_study_contract_bad_images(client, image_files, key, status, code):
    r = client.post("/predict", json={"image": b64(image_files[key].read_bytes())})
    env = r.json()
    assert r.status_code == env["statusCode"] == status and env["body"]["error"] == code, env
    assert env["body"]["message"]


@pytest.mark.parametrize(
    "content,code",
    [
        ('{"image": "not base64 at all!"}', "bad_base64"),
        ("@@@@", "bad_base64"),
        ('{"image": 12}', "missing_image"),
        ('{"picture": "abcd"}', "missing_image"),
        ("{not json", "bad_json"),
        ("", "empty_body"),
        ("[1, 2]", "missing_image"),
        ('"\u00e9t\u00e9"', "bad_base64"),
    ],
)
def test_study_contract_bad_requests(client, content, code):
    r = client.post("/predict", content=content.encode(), headers={"Content-Type": "application/json"})
    env = r.json()
    assert r.status_code == env["statusCode"] == 400 and env["body"]["error"] == code, env


def test_study_contract_refusal_is_200_not_a_lesion(client, lesion_jpeg, monkeypatch):
    refusing(monkeypatch, client)
    env = client.post("/predict", json={"image": b64(lesion_jpeg)}).json()
    assert env["statusCode"] == 200 and env["body"]["predicted_label"] == "not_a_lesion"
    assert "dermoscopic" in env["body"]["reason"]


def test_alpha_png_is_accepted(client, image_files):
    assert client.post("/predict", json={"image": b64(image_files["alpha"].read_bytes())}).status_code == 200


# ------------------------------------------------------------------ /v1


def test_v1_predict_multipart_and_json_agree(client, lesion_jpeg):
    a = client.post("/v1/predict", files={"file": ("x.jpg", lesion_jpeg, "image/jpeg")})
    b = client.post("/v1/predict", json={"image": b64(lesion_jpeg)})
    assert a.status_code == b.status_code == 200
    out = a.json()
    assert out["probability"] == pytest.approx(b.json()["probability"])
    assert out["label"] in ("benign", "malignant") and out["model_id"] and len(out["model_version"]) == 12
    assert out["inference_ms"] > 0 and out["threshold"] == client.app.state.service.predictor.info.threshold


def test_v1_predict_errors(client, image_files):
    for key, status in (("text", 415), ("tiny", 422), ("huge", 413), ("zero", 400)):
        r = client.post("/v1/predict", files={"file": ("x.jpg", image_files[key].read_bytes(), "image/jpeg")})
        assert r.status_code == status and r.json()["message"], (key, r.json())
    assert client.post("/v1/predict", files={"note": (None, "no file")}).status_code == 400
    assert client.post("/v1/predict", data={"note": "no file"}).status_code == 415  # urlencoded
    assert client.post("/v1/predict", content=b"x", headers={"Content-Type": "image/jpeg"}).status_code == 415
    assert client.post("/v1/predict?tta=maybe", json={"image": "abcd"}).status_code == 400


def test_v1_refusal_is_422_with_reason(client, lesion_jpeg, monkeypatch):
    refusing(monkeypatch, client)
    r = client.post("/v1/predict", files={"file": ("x.jpg", lesion_jpeg, "image/jpeg")})
    assert r.status_code == 422
    assert r.json()["label"] == "not_a_lesion" and "dermoscopic" in r.json()["message"]


def test_v1_tta_reaches_the_predictor(client, lesion_jpeg, monkeypatch):
    predictor = client.app.state.service.predictor
    seen, analyze = [], predictor.analyze

    def spy(images, tta=False):
        seen.append(tta)
        return analyze(images, tta)

    monkeypatch.setattr(predictor, "analyze", spy)
    r = client.post("/v1/predict?tta=true", json={"image": b64(lesion_jpeg)})
    assert r.status_code == 200 and r.json()["tta"] is True and seen == [True]


def test_v1_batch(client, lesion_jpeg, image_files):
    files = [
        ("files", (f"{i}.jpg", data, "image/jpeg"))
        for i, data in enumerate([lesion_jpeg, image_files["text"].read_bytes(), lesion_jpeg])
    ]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 415, 200] and results[1]["error"]
    assert results[0]["probability"] == pytest.approx(results[2]["probability"])
    assert client.post("/v1/predict/batch", json={"images": [b64(lesion_jpeg)] * 33}).status_code == 413
    assert client.post("/v1/predict/batch", json={"images": []}).status_code == 400
    assert client.post("/v1/predict/batch", json={"images": "abc"}).status_code == 400


def test_explain_is_501_without_the_module(client, lesion_jpeg, monkeypatch):
    monkeypatch.setitem(sys.modules, "lesionlab.inference.explain", None)  # import fails as if the module were absent
    r = client.post("/v1/predict?explain=true", json={"image": b64(lesion_jpeg)})
    assert r.status_code == 501 and "explain" in r.json()["message"]


def test_explain_returns_an_overlay(client, lesion_jpeg, monkeypatch):
    calls = []
    fake = types.ModuleType("lesionlab.inference.explain")

    def overlay_png(model_dir, image, target):
        calls.append((Path(model_dir), target))
        return png((8, 8))

    monkeypatch.setattr(fake, "overlay_png", overlay_png, raising=False)
    monkeypatch.setitem(sys.modules, "lesionlab.inference.explain", fake)
    r = client.post("/v1/predict?explain=true", files={"file": ("x.jpg", lesion_jpeg, "image/jpeg")})
    assert r.status_code == 200
    assert base64.b64decode(r.json()["explanation_png"]).startswith(b"\x89PNG")
    assert calls == [(client.app.state.service.model_dir, r.json()["label"])]  # the evidence for the label shown


@pytest.fixture(scope="module")
def twin_ensemble(tiny_run, tmp_path_factory) -> Path:
    """Two copies of tiny_run as an ensemble (no training): its label differs from a member's only by threshold."""
    root = tmp_path_factory.mktemp("twin-ensemble")
    for name in ("a", "b"):
        shutil.copytree(tiny_run, root / name)
    (root / "ens").mkdir()
    (root / "ens" / "ensemble.json").write_text(json.dumps({"members": ["../a", "../b"]}))
    return root / "ens"


def test_ensemble_explains_the_ensemble_label(twin_ensemble, lesion_jpeg, monkeypatch):
    explain = pytest.importorskip("lesionlab.inference.explain")
    from lesionlab.data.images import open_image
    from lesionlab.inference.loading import load_predictor

    member = load_predictor(twin_ensemble.parent / "a").analyze([open_image(lesion_jpeg)])[0]
    assert not member.refused
    flipped = "benign" if member.label == "malignant" else "malignant"  # an ensemble threshold that disagrees
    (twin_ensemble / "calibration.json").write_text(json.dumps({"threshold": 1.01 if flipped == "benign" else 0.0}))
    targets = []
    real = explain.gradcam

    def gradcam(model, x, target="predicted"):
        targets.append(target)
        return real(model, x, target)

    monkeypatch.setattr(explain, "gradcam", gradcam)
    with TestClient(create_app(twin_ensemble)) as c:
        wait_ready(c)
        r = c.post("/v1/predict?explain=true", json={"image": b64(lesion_jpeg)})
    assert r.status_code == 200, r.json()
    assert r.json()["label"] == flipped and targets == [flipped] and r.json()["explanation_png"]


def test_explain_with_the_real_grad_cam(client, lesion_jpeg):
    pytest.importorskip("lesionlab.inference.explain")
    r = client.post("/v1/predict?explain=true", files={"file": ("x.jpg", lesion_jpeg, "image/jpeg")})
    assert r.status_code in (200, 422), r.json()
    if r.status_code == 200:
        png_bytes = base64.b64decode(r.json()["explanation_png"])
        assert Image.open(io.BytesIO(png_bytes)).format == "PNG"


def test_model_card(client):
    card = client.get("/v1/model").json()
    assert card["backbone"] == "efficientnet_lite0" and card["input_size"] == 224
    assert card["threshold"]["policy"] and 0 < card["threshold"]["value"] < 1
    assert card["training_data"]["n_train"] > 0 and card["training_data"]["positive_class"] == "malignant"
    auc = card["metrics"]["test"]["auc"]
    assert set(auc) == {"value", "ci95"} and "at_threshold" in card["metrics"]["test"]
    assert card["licence"]["data"] and card["disclaimer"] == DISCLAIMER and "not a diagnosis" in card["intended_use"]
    assert card["external"] is None  # never scored on another clinic's images


def test_model_card_external_results_from_metrics_json():
    from lesionlab.evaluation.external import ExternalScores, external_metrics
    from lesionlab.serve.model_card import external_results

    def scored(labels: np.ndarray) -> ExternalScores:
        p = np.clip(0.6 * labels + np.random.default_rng(0).random(len(labels)) * 0.5, 0, 1)
        return ExternalScores(
            relpaths=[f"{i}.jpg" for i in range(len(labels))],
            probabilities=p,
            labels=labels,
            diagnoses=["melanoma" if y else "nevus" for y in labels],
            sources=["clinic"] * len(labels),
            refused=np.zeros(len(labels), bool),
        )

    both, benign = np.array([0] * 20 + [1] * 10), np.zeros(15, np.int64)
    external = {name: external_metrics(scored(y), 0.4, 50) for name, y in (("b", both), ("a", benign))}
    metrics = {"test": {}, "external": external}
    card = external_results(json.loads(json.dumps(metrics)))  # as read back from metrics.json
    assert card is not None and list(card) == ["a", "b"]
    assert (card["b"]["n"], card["b"]["n_malignant"], card["b"]["threshold"]) == (30, 10, 0.4)
    for m in ("auc", "sensitivity", "specificity"):
        lo, hi = card["b"][m]["ci95"]
        assert set(card["b"][m]) == {"value", "ci95"} and lo <= card["b"][m]["value"] <= hi
    assert card["a"]["auc"] is None and card["a"]["sensitivity"] is None and card["a"]["specificity"]["value"] > 0
    assert "single-class" in card["a"]["note"] and "note" not in card["b"]
    assert external_results({"test": {}}) is None


def _version(model_dir: Path) -> str:
    from lesionlab.serve.service import ModelService

    service = ModelService(model_dir)
    service.load()
    assert service.error is None, service.error
    return service.version


def test_model_version_tracks_calibration_and_not_the_folder_path(onnx_run, tmp_path):
    copy = tmp_path / "a" / "model"
    shutil.copytree(onnx_run, copy)
    before = _version(copy)
    assert len(before) == 12 and set(before) <= set("0123456789abcdef")
    shutil.copytree(copy, tmp_path / "b" / "model")
    assert _version(tmp_path / "b" / "model") == before  # where the folder lives is not part of the model
    cal = json.loads((copy / "calibration.json").read_text())
    cal["threshold"] = 0.123 if cal.get("threshold") != 0.123 else 0.321
    (copy / "calibration.json").write_text(json.dumps(cal))
    assert _version(copy) != before  # a re-evaluation moved the threshold: the labels may change


def test_ensemble_model_version_tracks_its_members(twin_ensemble):
    before = _version(twin_ensemble)
    member_cal = twin_ensemble.parent / "b" / "calibration.json"
    cal = json.loads(member_cal.read_text())
    cal["temperature"] = float(cal.get("temperature", 1.0)) * 2
    member_cal.write_text(json.dumps(cal))
    assert _version(twin_ensemble) != before


def test_onnx_only_folder_like_the_bundled_model(onnx_only, lesion_jpeg, monkeypatch):
    monkeypatch.setitem(sys.modules, "lesionlab.inference.explain", types.ModuleType("lesionlab.inference.explain"))
    with TestClient(create_app(onnx_only)) as c:
        wait_ready(c)
        assert c.post("/predict", json={"image": b64(lesion_jpeg)}).status_code == 200
        card = c.get("/v1/model").json()
        assert card["runtime"] == "onnxruntime" and card["model_card"].startswith("# test model card")
        r = c.post("/v1/predict?explain=true", json={"image": b64(lesion_jpeg)})
        assert r.status_code == 501 and "model.pt" in r.json()["message"]


def test_bundled_default_model(lesion_jpeg):
    from lesionlab.inference.loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.onnx").exists():
        pytest.skip("no bundled default model in this checkout")
    with TestClient(create_app()) as c:  # no model folder: the bundled one
        wait_ready(c)
        r = c.post("/predict", json={"image": b64(lesion_jpeg)})
        assert r.status_code == 200 and r.json()["body"]["predicted_label"] in ("benign", "malignant", "not_a_lesion")
        card = c.get("/v1/model").json()
        assert card["runtime"] == "onnxruntime" and card["model_card"] and card["lesion_detector"] is True
        assert card["lesion_detector_threshold"] > 0
        assert card["metrics"]["test"]["auc"]["ci95"][0] > 0.5


def test_torch_runtime_when_no_onnx(tiny_run, lesion_jpeg):
    with TestClient(create_app(tiny_run, runtime="torch")) as c:
        wait_ready(c)
        assert c.get("/v1/model").json()["runtime"] == "pytorch"
        assert c.post("/v1/predict", json={"image": b64(lesion_jpeg)}).status_code == 200


def test_backend_keyword_is_a_deprecated_alias_of_runtime(tiny_run):
    with pytest.deprecated_call(match="runtime="):
        app = create_app(tiny_run, backend="torch")
    assert app.state.service.backend == "torch"  # ModelService still calls it backend
    with pytest.raises(TypeError, match="runtime= only"):
        create_app(tiny_run, runtime="onnx", backend="torch")


# ------------------------------------------------------------------ health, page, docs


def test_health_endpoints(client):
    for prefix in ("", "/v2"):
        assert client.get(f"{prefix}/health/live").json()["live"] is True
        ready = client.get(f"{prefix}/health/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True


def test_not_ready_until_loaded_and_warm(onnx_run, monkeypatch):
    from lesionlab.serve import service as service_module

    gate = threading.Event()
    real = service_module.load_predictor
    monkeypatch.setattr(service_module, "load_predictor", lambda *a: gate.wait(30) and real(*a))
    with TestClient(create_app(onnx_run)) as c:
        assert c.get("/health/live").status_code == 200
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        busy = c.post("/predict", json={"image": "AAAA"})
        assert busy.status_code == 503 and busy.headers["Retry-After"]
        gate.set()
        wait_ready(c)


def test_load_before_accepting_is_ready_when_startup_ends(onnx_run, monkeypatch):
    """With several workers each one must be warm before it takes connections (no 503 from a cold sibling)."""
    from lesionlab.serve import service as service_module

    real = service_module.load_predictor

    def slow_load(*a):
        time.sleep(0.5)
        return real(*a)

    monkeypatch.setattr(service_module, "load_predictor", slow_load)
    with TestClient(create_app(onnx_run, load_before_accepting=True)) as c:
        assert c.get("/health/ready").status_code == 200  # no waiting: start-up already loaded it


def test_failed_load_is_reported(onnx_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_run, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with TestClient(create_app(broken)) as c:
        deadline = time.monotonic() + 30
        while c.get("/health/ready").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and r.json()["detail"]
        assert c.post("/v1/predict", json={"image": "AAAA"}).json()["error"] == "model_failed"


def test_page_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "not a diagnosis" in page.text and 'type="file"' in page.text and 'id="explain"' in page.text
    for attr in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert attr not in page.text  # nothing fetched from the internet
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    expected = {"/predict", "/v1/predict", "/v1/predict/batch", "/v1/model", "/health/ready", "/v2/health/ready"}
    assert expected <= set(paths)


# ------------------------------------------------------------------ limits


@pytest.fixture(scope="module")
def small_cap_client(onnx_run):
    with TestClient(create_app(onnx_run, max_body_bytes=4096)) as c:
        wait_ready(c)
        yield c


def test_body_cap_declared_length(small_cap_client):
    r = small_cap_client.post("/predict", content=b"A" * 5000, headers={"Content-Type": "text/plain"})
    assert r.status_code == r.json()["statusCode"] == 413
    r = small_cap_client.post("/v1/predict", files={"file": ("x.jpg", b"\xff" * 5000, "image/jpeg")})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_body_cap_chunked(small_cap_client):
    def chunks():
        for _ in range(10):
            yield b"A" * 1000

    r = small_cap_client.post("/predict", content=chunks(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 413


def _blocking(client, monkeypatch, seconds: float | None = None) -> threading.Event:
    """Every classification waits on the returned event (or sleeps ``seconds``)."""
    gate = threading.Event()
    service = client.app.state.service
    real = service.classify_blocking

    def slow(images, tta):
        if seconds is None:
            gate.wait(30)
        else:
            time.sleep(seconds)
        return real(images, tta)

    monkeypatch.setattr(service, "classify_blocking", slow)
    return gate


def test_concurrency_cap_answers_503_with_retry_after(onnx_run, lesion_jpeg, monkeypatch):
    app = create_app(onnx_run, max_concurrency=1)
    with TestClient(app) as c:
        wait_ready(c)
        gate = _blocking(c, monkeypatch)
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/predict", json={"image": b64(lesion_jpeg)})))
        t.start()
        deadline = time.monotonic() + 10
        while app.state.service.admission.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/predict", json={"image": b64(lesion_jpeg)})
        gate.set()
        t.join(30)
        assert r.status_code == r.json()["statusCode"] == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["body"]["error"] == "busy"
        assert first[0].status_code == 200
        assert c.post("/predict", json={"image": b64(lesion_jpeg)}).status_code == 200  # slot freed


def test_request_timeout(onnx_run, lesion_jpeg, monkeypatch):
    app = create_app(onnx_run, timeout_s=0.2, max_concurrency=1)
    with TestClient(app) as c:
        wait_ready(c)
        _blocking(c, monkeypatch, seconds=0.6)
        r = c.post("/v1/predict", json={"image": b64(lesion_jpeg)})
        assert r.status_code == 503 and r.json()["error"] == "timeout" and r.headers["Retry-After"]
        # the slot stays taken until the work really ends, then frees itself
        deadline = time.monotonic() + 5
        while app.state.service.admission.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.service.admission.active == 0


def test_timed_out_jobs_that_never_started_never_run():
    import asyncio

    from lesionlab.serve.admission import Admission
    from lesionlab.serve.errors import ServiceError

    admission = Admission(max_concurrency=8, timeout_s=0.2, threads=1)
    calls: list[int] = []

    def slow(i: int) -> int:
        calls.append(i)
        time.sleep(0.5)
        return i

    async def burst() -> list:
        return await asyncio.gather(*(admission.run(slow, i) for i in range(4)), return_exceptions=True)

    try:
        results = asyncio.run(burst())
        assert all(isinstance(r, ServiceError) and r.code == "timeout" and r.headers["Retry-After"] for r in results)
        deadline = time.monotonic() + 5
        while admission.active and time.monotonic() < deadline:  # the running job frees its slot when it ends
            time.sleep(0.02)
        assert admission.active == 0
        time.sleep(0.3)  # room for a wrongly queued job to start
        assert calls == [0]  # only the job that had started ran; the other three were dropped
    finally:
        admission.shutdown()


def test_late_failure_after_a_timeout_is_not_reported_as_unhandled(caplog):
    import asyncio
    import gc

    from lesionlab.serve.admission import Admission
    from lesionlab.serve.errors import ServiceError

    admission = Admission(max_concurrency=2, timeout_s=0.05, threads=1)

    def fails_late() -> None:
        time.sleep(0.2)
        raise RuntimeError("late failure")

    async def call() -> None:
        with pytest.raises(ServiceError, match="did not finish"):
            await admission.run(fails_late)
        await asyncio.sleep(0.4)  # the job fails while the loop still runs

    try:
        asyncio.run(call())
        gc.collect()
        assert admission.active == 0
        assert "never retrieved" not in caplog.text
    finally:
        admission.shutdown()


# ------------------------------------------------------------------ auth


def test_bearer_auth(onnx_run, lesion_jpeg):
    with TestClient(create_app(onnx_run, tokens=["s3cret", "other"])) as c:
        wait_ready(c)
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200
        for method, path in (
            ("get", "/"),
            ("get", "/docs"),
            ("get", "/openapi.json"),
            ("get", "/v1/model"),
            ("post", "/v1/predict"),
            ("post", "/v1/predict/batch"),
            ("post", "/predict"),
        ):
            r = getattr(c, method)(path)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
        r = c.post("/predict", json={"image": b64(lesion_jpeg)}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == r.json()["statusCode"] == 401
        ok = c.post("/predict", json={"image": b64(lesion_jpeg)}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/v1/model", headers={"Authorization": "bearer other"}).status_code == 200


def test_tokens_from_env_and_file(tmp_path):
    from lesionlab.serve.settings import ServeSettings

    f = tmp_path / "tokens"
    f.write_text("# comment\nfrom-file\n\n")
    s = ServeSettings.from_env(
        {"LESIONLAB_API_TOKENS": "a, b", "LESIONLAB_API_TOKENS_FILE": str(f), "LESIONLAB_SERVE_MAX_BODY_BYTES": "123"}
    )
    assert s.tokens == ["a", "b", "from-file"] and s.max_body_bytes == 123
    assert "LESIONLAB_API_TOKENS" not in s.to_env() and "s3" not in json.dumps(s.to_env())
    assert ServeSettings.from_env(ServeSettings(load_before_accepting=True).to_env()).load_before_accepting
    with pytest.raises(ValueError, match="LESIONLAB_SERVE_LOAD_BEFORE_ACCEPTING='maybe' is not a valid true/false"):
        ServeSettings.from_env({"LESIONLAB_SERVE_LOAD_BEFORE_ACCEPTING": "maybe"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timeout_s": 0}, r"--timeout \(LESIONLAB_SERVE_TIMEOUT_S\) must be a number of seconds > 0, got 0"),
        ({"inference_threads": 0}, r"--inference-threads .* must be a whole number >= 1, got 0"),
        ({"max_concurrency": 0}, r"--max-concurrency .* >= 1, got 0"),
        ({"num_threads": -1}, r"--threads .* >= 1, got -1"),
        ({"max_batch": 0}, r"LESIONLAB_SERVE_MAX_BATCH must be a whole number >= 1, got 0"),
        ({"runtime": "onxx"}, r"--runtime .* must be one of auto, onnx, torch, got 'onxx'"),
    ],
)
def test_bad_settings_are_refused_with_the_option_named(kwargs, message):
    from lesionlab.serve.settings import ServeSettings

    with pytest.raises(ValueError, match=message):
        ServeSettings(**kwargs)


def test_bad_runtime_from_the_environment_is_refused():
    from lesionlab.serve.settings import ServeSettings

    with pytest.raises(ValueError, match="got 'onxx'"):
        ServeSettings.from_env({"LESIONLAB_SERVE_RUNTIME": "onxx"})
    assert ServeSettings.from_env({"LESIONLAB_SERVE_RUNTIME": "torch"}).runtime == "torch"
    with pytest.warns(FutureWarning, match="LESIONLAB_SERVE_RUNTIME"):  # the old name still works, and says so
        assert ServeSettings.from_env({"LESIONLAB_SERVE_BACKEND": "torch"}).runtime == "torch"


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--runtime", "onxx"], ["--workers", "0"], ["--threads", "0"]])
def test_cli_serve_refuses_bad_options_before_uvicorn(onnx_run, monkeypatch, args):
    import os

    import uvicorn
    from typer.testing import CliRunner

    from lesionlab.cli import app

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(a))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    result = CliRunner().invoke(app, ["serve", "--model", str(onnx_run), *args])
    assert result.exit_code == 2 and not calls, result.output
    assert args[0] in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ no 500, nothing on disk or in logs


def test_odd_inputs_never_500(client):
    rng = np.random.default_rng(1)
    bodies = [rng.bytes(n) for n in (1, 7, 300)] + [
        b"{}",
        b"null",
        b"[]",
        b'{"image": null}',
        b'"',
        b"\x00" * 64,
        b'{"image": "' + b"A" * 4001 + b'"}',
        b"data:image/png;base64,",
        json.dumps({"image": "data:;base64,QUJD"}).encode(),
        b"[" * 200_000,
        b'{"image": ' * 50_000,
    ]
    for path in ("/predict", "/v1/predict", "/v1/predict/batch"):
        for body in bodies:
            for ctype in ("application/json", "text/plain", "multipart/form-data; boundary=x", "multipart/form-data"):
                r = client.post(path, content=body, headers={"Content-Type": ctype})
                assert r.status_code < 500, (path, body[:40], ctype, r.text)
    assert client.get("/nowhere").status_code == 404
    assert client.get("/predict").status_code == 405


def test_decoder_crash_is_a_bad_image_not_a_500(client, lesion_jpeg, monkeypatch):
    import struct

    from lesionlab.serve import service as service_module

    def crash(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")  # as a Pillow plugin might on hostile bytes

    monkeypatch.setattr(service_module, "open_image", crash)
    r = client.post("/v1/predict", json={"image": b64(lesion_jpeg)})
    assert r.status_code == 415 and "could not be decoded" in r.json()["message"]


def test_uploads_never_touch_disk_or_logs(client, tmp_path, monkeypatch, caplog):
    import tempfile

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    rng = np.random.default_rng(2)
    big = io.BytesIO()  # > 1 MB: where Starlette's form parser would spool to a temp file
    Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big, "PNG")
    assert big.tell() > 1_100_000
    marker = b64(big.getvalue())[1000:1040]
    with caplog.at_level("DEBUG"):
        r = client.post("/v1/predict", files={"file": ("big.png", big.getvalue(), "image/png")})
        client.post("/predict", json={"image": b64(big.getvalue())})
    assert r.status_code in (200, 422) and not list(spool.iterdir())  # noise may be refused as not a lesion
    assert marker not in caplog.text


# The schemathesis run (every check, against the served app) is in test_openapi.py.


# ------------------------------------------------------------------ AWS Lambda


@pytest.fixture
def lambda_env(onnx_run, monkeypatch):
    monkeypatch.setenv("LESIONLAB_MODEL", str(onnx_run))
    monkeypatch.setattr(aws_lambda, "_loaded", None)
    monkeypatch.setattr(aws_lambda, "limit_blas_threads", lambda: None)  # process-wide; not inside pytest
    yield
    aws_lambda._loaded = None


def rest_event(body: str | None, is_b64: bool = False) -> dict:
    """The documented API Gateway REST (v1) proxy event, trimmed to what a handler may read."""
    return {
        "resource": "/predict",
        "path": "/predict",
        "httpMethod": "POST",
        "headers": {"Content-Type": "application/json"},
        "multiValueHeaders": {},
        "queryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {"resourcePath": "/predict", "httpMethod": "POST", "stage": "prod"},
        "body": body,
        "isBase64Encoded": is_b64,
    }


def http_api_event(body: str, is_b64: bool) -> dict:
    """The documented API Gateway HTTP API (payload 2.0) event."""
    return {
        "version": "2.0",
        "routeKey": "POST /predict",
        "rawPath": "/predict",
        "rawQueryString": "",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/predict"}, "stage": "$default"},
        "body": body,
        "isBase64Encoded": is_b64,
    }


def call_lambda(event) -> tuple[int, dict]:
    out = aws_lambda.handler(event, None)
    assert isinstance(out["body"], str) and out["headers"]["Content-Type"] == "application/json"
    return out["statusCode"], json.loads(out["body"])


def test_lambda_rest_event(lambda_env, lesion_jpeg, client):
    status, body = call_lambda(rest_event(json.dumps({"image": b64(lesion_jpeg)})))
    expected = client.post("/predict", json={"image": b64(lesion_jpeg)}).json()["body"]
    assert status == 200 and body["predicted_label"] == expected["predicted_label"]
    assert body["probability"] == pytest.approx(expected["probability"])


def test_lambda_base64_encoded_events(lambda_env, lesion_jpeg):
    as_json = base64.b64encode(json.dumps({"image": b64(lesion_jpeg)}).encode()).decode()
    as_text = base64.b64encode(b64(lesion_jpeg).encode()).decode()
    raw_image = b64(lesion_jpeg)  # binary media type: the body is the file itself, base64-encoded by API Gateway
    results = [call_lambda(http_api_event(b, True)) for b in (as_json, as_text, raw_image)]
    results.append(call_lambda(rest_event(b64(lesion_jpeg))))  # bare base64 text, not flagged
    assert [s for s, _ in results] == [200] * 4
    assert len({round(b["probability"], 9) for _, b in results}) == 1


def test_lambda_errors(lambda_env, image_files, monkeypatch):
    cases = [
        (rest_event("not base64!", True), 400),
        (rest_event(None), 400),
        (rest_event("{oops"), 400),
        (rest_event(json.dumps({"image": b64(image_files["text"].read_bytes())})), 415),
        (rest_event(json.dumps({"image": b64(image_files["tiny"].read_bytes())})), 422),
        (rest_event(json.dumps({"image": b64(image_files["huge"].read_bytes())})), 413),
        ("junk", 400),
    ]
    for event, status in cases:
        got, body = call_lambda(event)
        assert got == status and body["error"] and body["message"], (status, body)
    monkeypatch.setenv("LESIONLAB_SERVE_MAX_BODY_BYTES", "100")
    monkeypatch.setattr(aws_lambda, "_loaded", None)
    assert call_lambda(rest_event("A" * 200))[0] == 413


def test_lambda_direct_invocation(lambda_env, lesion_jpeg):
    status, body = call_lambda({"image": b64(lesion_jpeg)})
    assert status == 200 and body["predicted_label"] in ("benign", "malignant")


# ------------------------------------------------------------------ Dockerfile and CLI wiring


def test_dockerfile_copies_existing_paths_and_runs_the_service():
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")  # join continued lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY") and "--from" not in ln]
    assert copies, "the Dockerfile copies nothing"
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"runs", ".venv", "tests"} <= {p.strip("/*") for p in ignored}
    cmd = next(ln for ln in lines if ln.startswith("CMD"))
    argv = json.loads(cmd[3:].strip())
    assert argv[:2] == ["lesionlab", "serve"] and argv[argv.index("--host") + 1] == "0.0.0.0"
    port = argv[argv.index("--port") + 1]
    assert f"EXPOSE {port}" in lines and any(ln.startswith("HEALTHCHECK") and "/health/ready" in ln for ln in lines)
    assert any(ln.startswith("USER") and "root" not in ln for ln in lines)


def test_cli_serve_starts_uvicorn_with_the_settings(onnx_run, monkeypatch):
    import os

    import uvicorn
    from typer.testing import CliRunner

    from lesionlab.cli import app

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: calls.append((target, kw)))
    for key in [k for k in os.environ if k.startswith("LESIONLAB_SERVE_")] + ["LESIONLAB_MODEL"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the command writes its settings here
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            str(onnx_run),
            "--port",
            "8123",
            "--workers",
            "2",
            "--max-body-bytes",
            "5000000",
            "--timeout",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    target, kw = calls[0]
    assert target == "lesionlab.serve.app:app_from_env" and kw["factory"] is True
    assert kw["workers"] == 2 and kw["port"] == 8123 and kw["host"] == "127.0.0.1"
    from lesionlab.serve.settings import ServeSettings

    s = ServeSettings.from_env(os.environ)
    assert s.model_dir == str(onnx_run.resolve()) and s.max_body_bytes == 5_000_000 and s.timeout_s == 3.0
    assert s.load_before_accepting  # several workers: each loads before it takes connections
    assert CliRunner().invoke(app, ["serve", "--model", str(onnx_run / "nope")]).exit_code == 2


def test_tta_follows_the_operating_point_unless_the_request_says(onnx_only, lesion_jpeg, tmp_path, monkeypatch):
    """A threshold fitted on TTA scores belongs to TTA scores: such a model uses TTA unless asked not to."""
    folder = tmp_path / "tta-model"
    shutil.copytree(onnx_only, folder)
    cal = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration.json").write_text(json.dumps(cal | {"tta": True}))
    app = create_app(folder)
    with TestClient(app) as c:
        wait_ready(c)
        predictor = app.state.service.predictor
        seen, analyze = [], predictor.analyze

        def spy(images, tta=None):
            seen.append(tta)
            return analyze(images, tta)

        monkeypatch.setattr(predictor, "analyze", spy)
        assert c.get("/v1/model").json()["tta"] is True
        assert c.post("/v1/predict", json={"image": b64(lesion_jpeg)}).json()["tta"] is True
        assert c.post("/v1/predict?tta=false", json={"image": b64(lesion_jpeg)}).json()["tta"] is False
        assert c.post("/v1/predict/batch", json={"images": [b64(lesion_jpeg)]}).json()["tta"] is True
        assert c.post("/predict", json={"image": b64(lesion_jpeg)}).status_code == 200
        assert seen == [True, False, True, None]  # the study's route: the predictor's own setting


def test_cli_serve_refuses_a_model_without_an_operating_point(onnx_run, tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from lesionlab.cli import app

    folder = tmp_path / "unevaluated"
    shutil.copytree(onnx_run, folder)
    (folder / "calibration.json").unlink()
    (folder / "preprocess.json").unlink()
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(a))
    result = CliRunner().invoke(app, ["serve", "--model", str(folder)])
    assert result.exit_code == 2 and not calls and "lesionlab evaluate" in result.output


def test_the_service_starts_without_the_evaluation_stack():
    """Importing the app pulls in neither scikit-learn nor scipy.stats (1-2 s of every server's and Lambda's cold
    start): the disclaimer and the metric names live in light modules, metrics.py imports them where used."""
    assert modules_imported("import lesionlab.serve.app", {"sklearn", "scipy.stats"}) == []
