"""The OpenAPI document is the service's contract: schemathesis with every check finds no answer it does not
declare, and the document's bounds (batch size, body cap, bearer auth) are the app's own settings."""

from __future__ import annotations

import collections
import io
import re
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import engine
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, StopReason, events

from lesionlab.inference.loading import DEFAULT_MODEL_DIR
from lesionlab.serve import create_app
from lesionlab.serve.app import example_image
from lesionlab.serve.codec import BASE64_PATTERN, decode_base64
from lesionlab.serve.errors import ServiceError

# The image operations, whose answers also depend on what the bytes are, not only on their shape.
IMAGE_OPERATIONS = "^/(v1/)?predict"
# Schemathesis' defaults (4.x) plus what the document declares on the image operations, each with why:
# 413: an image over the pixel limit, or a body over the cap (the sum of a batch's files, which no schema bounds);
# 415: bytes that are no image (JSON Schema can say "base64", not "decodes as a PNG");
# 422: an image under 32x32, or one the lesion detector refuses (only decoding or the model can tell).
ACCEPTED_BUT_UNDECIDABLE = [413, 415, 422]
POSITIVE_STATUSES = ["2xx", "3xx", 401, 403, 404, 409, 429, "5xx", *ACCEPTED_BUT_UNDECIDABLE]
# 413 is a rejection too (RFC 9110 15.5.14): more than max_batch images, a string longer than maxLength.
NEGATIVE_STATUSES = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
# Checks left out of the run, each with the reason beside it. None: every registered check runs.
EXCLUDED_CHECKS: dict[str, str] = {}
# Fuzzing cases per operation; the examples and coverage phases add their own (about 270 cases in all).
EXAMPLES_PER_OPERATION = 25
SEED = 20261201

CONFIG: dict[str, Any] = {
    "seed": SEED,
    "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "database": "none"},
    "continue-on-failure": True,  # every failure of an operation, not only its first
    "request-timeout": 60,  # the default 10 s is less than a slow inference may take on a shared 2-core runner
    "checks": {name: {"enabled": False} for name in EXCLUDED_CHECKS},
    "operations": [
        {
            "include-path-regex": IMAGE_OPERATIONS,
            "checks": {
                "positive_data_acceptance": {"expected-statuses": POSITIVE_STATUSES},
                "negative_data_rejection": {"expected-statuses": NEGATIVE_STATUSES},
            },
        }
    ],
}


@dataclass
class Run:
    """What one ``schemathesis run`` found, gathered from the engine's events (as its CLI does)."""

    cases: int = 0
    seconds: float = 0.0
    stop_reason: StopReason | None = None
    checks: set[str] = field(default_factory=set)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_schemathesis(app, config: dict, **load_kwargs) -> Run:
    """``schemathesis run`` in process: examples, coverage, fuzzing and stateful phases against the ASGI app."""
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=SchemathesisConfig.from_dict(config), **load_kwargs
    )
    run, start = Run(), time.monotonic()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            run.cases += len(recorder.cases)
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    run.statuses[recorder.label, interaction.response.status_code] += 1
            for nodes in recorder.checks.values():
                for node in nodes:
                    run.checks.add(node.name)
                    if node.status == Status.FAILURE:
                        failure = node.failure_info.failure if node.failure_info else None
                        status = getattr(failure, "status_code", "")
                        title = f"[{status}] {failure.title}: {failure.message}" if failure else ""
                        run.failures.append(f"{recorder.label} {node.name} {title}")
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            run.errors.append(repr(event.exception))
        elif isinstance(event, events.EngineFinished):
            run.stop_reason = event.stop_reason
            run.failures += [f"after run: {f.title}" for f in event.failures]
    run.seconds = time.monotonic() - start
    return run


def enabled_checks(config: dict) -> set[str]:
    load_all_checks()
    checks = SchemathesisConfig.from_dict(config).projects.get_default().checks_config_for()
    return {name for name in CHECKS.get_all_names() if checks.get_by_name(name=name).enabled}


def test_every_check_is_enabled():
    """``--checks all``: each registered check is on unless EXCLUDED_CHECKS names it with a reason."""
    load_all_checks()
    assert enabled_checks(CONFIG) == set(CHECKS.get_all_names()) - set(EXCLUDED_CHECKS)
    assert {"positive_data_acceptance", "negative_data_rejection", "ignored_auth"} <= enabled_checks(CONFIG)
    assert all(reason.strip() for reason in EXCLUDED_CHECKS.values())


@pytest.fixture
def fast_explainer(monkeypatch):
    """A stand-in Grad-CAM: the contract of explain=true (a base64 PNG in the answer) without seconds of
    PyTorch per request; the real overlay has its own tests (test_serve.py, test_explain.py)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "PNG")
    fake = types.ModuleType("lesionlab.inference.explain")
    monkeypatch.setattr(fake, "overlay_png", lambda model_dir, image, target: buf.getvalue(), raising=False)
    monkeypatch.setitem(sys.modules, "lesionlab.inference.explain", fake)


def test_schemathesis_all_checks_finds_nothing(fast_explainer):
    """The served app (bundled model, default settings) against its own document, with every check."""
    if not (DEFAULT_MODEL_DIR / "model.onnx").exists():
        pytest.skip("no bundled default model in this checkout")
    # the model loads in the lifespan start-up, which schemathesis runs before its first request
    run = run_schemathesis(create_app(load_before_accepting=True), CONFIG)
    assert run.stop_reason == StopReason.COMPLETED and not run.errors, run.errors
    assert not run.failures, "\n".join(run.failures)
    assert run.checks == enabled_checks(CONFIG)  # each enabled check judged some answer
    assert run.cases >= 200 and max(code for _, code in run.statuses) < 500
    for label in ("POST /predict", "POST /v1/predict", "POST /v1/predict/batch"):
        assert run.statuses[label, 200] > 0, label  # the documented examples: success answers were validated too


def test_schemathesis_with_bearer_tokens(fast_explainer):
    """With tokens the document declares the bearer scheme; ignored_auth then checks every guarded operation
    answers 401 without the token (or with a wrong one)."""
    if not (DEFAULT_MODEL_DIR / "model.onnx").exists():
        pytest.skip("no bundled default model in this checkout")
    auth = {"Authorization": "Bearer t0ken"}
    config = {**CONFIG, "headers": auth, "generation": {**CONFIG["generation"], "max-examples": 3}}
    run = run_schemathesis(create_app(tokens=["t0ken"], load_before_accepting=True), config, headers=auth)
    assert run.stop_reason == StopReason.COMPLETED and not run.errors, run.errors
    assert not run.failures, "\n".join(run.failures)
    assert "ignored_auth" in run.checks and run.statuses["GET /v1/model", 401] > 0


# ------------------------------------------------------------------ the document follows the settings


def _body_schema(doc: dict, path: str, media_type: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"]


@pytest.mark.parametrize("max_batch", [1, 8, 32])
def test_max_items_is_the_configured_batch_limit(max_batch):
    doc = create_app(max_batch=max_batch, max_body_bytes=4096).openapi()
    files = _body_schema(doc, "/v1/predict/batch", "multipart/form-data")["properties"]["files"]
    images = _body_schema(doc, "/v1/predict/batch", "application/json")["properties"]["images"]
    assert files["maxItems"] == images["maxItems"] == max_batch and files["minItems"] == images["minItems"] == 1
    assert f"Up to {max_batch} images" in doc["paths"]["/v1/predict/batch"]["post"]["description"]
    study = _body_schema(doc, "/predict", "application/json")["oneOf"][0]["properties"]["image"]
    assert study["maxLength"] == images["items"]["maxLength"] == files["items"]["maxLength"] == 4096


def test_too_many_images_get_the_declared_413():
    """max_batch + 1 items violate maxItems; the answer is 413 batch_too_large, declared with its body."""
    app = create_app(max_batch=2, load_before_accepting=True)
    with TestClient(app) as c:
        responses = app.openapi()["paths"]["/v1/predict/batch"]["post"]["responses"]
        assert responses["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        image = example_image()
        for r in (
            c.post("/v1/predict/batch", json={"images": [image] * 3}),
            c.post("/v1/predict/batch", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(3)]),
        ):
            assert r.status_code == 413 and r.json()["error"] == "batch_too_large", r.json()
            assert set(r.json()) == {"error", "message"} and "at most 2" in r.json()["message"]
        ok = c.post("/v1/predict/batch", json={"images": [image] * 2})
        assert ok.status_code == 200 and [x["status"] for x in ok.json()["results"]] == [200, 200]


def test_declared_errors_and_no_framework_422():
    doc = create_app().openapi()
    ops = {(m, p): o for p, item in doc["paths"].items() for m, o in item.items()}
    for key in [("post", "/predict"), ("post", "/v1/predict"), ("post", "/v1/predict/batch")]:
        assert {"400", "401", "413", "415", "503"} <= set(ops[key]["responses"]), key
        assert "Retry-After" in ops[key]["responses"]["503"]["headers"]
        assert ops[key]["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert "422" not in ops["post", "/v1/predict/batch"]["responses"]  # refusals are per-item statuses
    assert "422" in ops["post", "/predict"]["responses"] and "501" in ops["post", "/v1/predict"]["responses"]
    assert "HTTPValidationError" not in str(doc)  # a bad query value answers 400 in the route's own format
    assert "security" not in str(doc)  # no tokens: nothing to authenticate
    assert create_app().openapi()["paths"]["/health/ready"]["get"]["responses"]["503"]["content"]


def test_bearer_scheme_is_declared_where_tokens_are_checked():
    with TestClient(create_app(tokens=["t0ken"])) as c:
        assert c.get("/openapi.json").status_code == 401
        doc = c.get("/openapi.json", headers={"Authorization": "Bearer t0ken"}).json()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in doc["paths"].items():
        for operation in item.values():
            secured = operation.get("security") == [{"bearer": []}]
            assert secured == (not path.startswith(("/health", "/v2/health"))), path


# ------------------------------------------------------------------ the base64 pattern is what the codec reads


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.from_regex(BASE64_PATTERN))
def test_every_string_the_pattern_admits_decodes_to_bytes(text):
    assert decode_base64(text)


@pytest.mark.parametrize("text", ["", "A", "AAAAA", "data:image/png;base64,", "QUJD!", "é"])
def test_the_pattern_refuses_what_the_codec_refuses(text):
    assert not re.search(BASE64_PATTERN, text)
    with pytest.raises(ServiceError) as e:
        decode_base64(text)
    assert e.value.status == 400 and e.value.code in ("bad_base64", "empty_image")
