"""The HTTP service: routes decode requests, the ModelService runs the Predictor, responses encode answers.

Build it with :func:`create_app` (tests, embedding) or let uvicorn build it from the environment with
:func:`app_from_env` (``lesionlab serve --workers N``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Iterable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lesionlab import __version__
from lesionlab.data.images import DEFAULT_MAX_PIXELS
from lesionlab.evaluation.report import DISCLAIMER
from lesionlab.serve import codec
from lesionlab.serve.errors import ServiceError
from lesionlab.serve.middleware import BearerAuth, BodyLimit
from lesionlab.serve.model_card import model_card
from lesionlab.serve.responses import (
    STUDY_PATH,
    BatchItem,
    BatchOut,
    PredictionOut,
    RefusalOut,
    StudyEnvelope,
    StudyRequest,
    error_response,
    error_schema,
    study_success,
)
from lesionlab.serve.service import ModelService, Outcome, limit_blas_threads
from lesionlab.serve.settings import ServeSettings

log = logging.getLogger("lesionlab.serve")

STUDY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [StudyRequest.model_json_schema(), {"type": "string", "description": "bare base64"}]
                }
            },
            "text/plain": {"schema": {"type": "string", "description": "bare base64, as API Gateway passes it"}},
        },
    }
}
V1_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "application/json": {"schema": StudyRequest.model_json_schema()},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": 32,
                        }
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 32}
                    },
                }
            },
        },
    }
}
ERROR_TEXT = {
    400: "Bad request (bad base64, JSON or multipart; bad query value)",
    401: "Missing or invalid bearer token",
    413: "Body, image pixels or batch too large",
    415: "Not an image, or an unsupported format",
    422: "Image smaller than 32x32, or refused as not a lesion (then with label/probability)",
    501: "Explanation not available for this model",
    503: "Busy, timed out or model not ready (Retry-After)",
}
TTA_QUERY = Query(
    None,
    description="Test-time augmentation: mean over the 8 flips/rotations (8x the compute). "
    "Default: as the model's threshold was fitted (`tta` in GET /v1/model)",
)


def _errors(path: str, *codes: int) -> dict:
    return {c: {"model": error_schema(path), "description": ERROR_TEXT[c]} for c in codes}


# ------------------------------------------------------------------ routes


def health_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["health"])

    def live() -> dict:
        return {"status": "live", "live": True}

    def ready() -> JSONResponse:
        body = {"status": service.state, "ready": service.ready}
        if service.ready:
            body["model_id"] = service.predictor.info.model_id  # type: ignore[union-attr]
        elif service.error:
            body["detail"] = service.error
        return JSONResponse(body, status_code=200 if service.ready else 503)

    ready_doc = {503: {"description": "Model loading, or failed to load (see detail)"}}
    for prefix in ("", "/v2"):
        router.add_api_route(f"{prefix}/health/live", live, methods=["GET"], summary="Liveness")
        router.add_api_route(
            f"{prefix}/health/ready",
            ready,
            methods=["GET"],
            responses=ready_doc,
            summary="Readiness: model loaded and warmed up",
        )
    return router


def study_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["study contract"])

    @router.post(
        STUDY_PATH,
        response_model=StudyEnvelope,
        openapi_extra=STUDY_BODY,
        responses=_errors(STUDY_PATH, 400, 401, 413, 415, 422, 503),
    )
    async def predict_study(request: Request) -> dict:
        """The study's contract: `{"image": "<base64>"}` (or a bare base64 body) in, a Lambda-style envelope out.

        A refused input answers statusCode 200 with predicted_label `not_a_lesion` and the reason."""
        image = codec.study_image(await request.body())
        outcome = (await service.classify([image]))[0][0]
        if outcome.error:
            raise outcome.error
        return study_success(outcome.prediction, service.predictor.info, service.version)  # type: ignore[arg-type,union-attr]

    return router


def _refusal(outcome: Outcome, service: ModelService) -> JSONResponse:
    p = outcome.prediction
    body = RefusalOut(
        error="not_a_lesion",
        message=f"refused: {p.reason}; send a dermoscopic photo of one lesion",
        probability=p.probability,
        ood_score=p.ood_score,
        model_id=service.predictor.info.model_id,
        model_version=service.version,
    )
    return JSONResponse(body.model_dump(), status_code=422)


def v1_router(service: ModelService, max_batch: int) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["v1"])

    @router.post(
        "/predict",
        response_model=PredictionOut,
        openapi_extra=V1_BODY,
        responses=_errors("/v1/predict", 400, 401, 413, 415, 422, 501, 503),
    )
    async def predict(
        request: Request,
        tta: bool | None = TTA_QUERY,
        explain: bool = Query(False, description="Add a Grad-CAM overlay (needs model.pt)"),
    ):
        """One image (multipart `file` or JSON base64): label, P(malignant), threshold, model id/version, timing."""
        images = codec.request_images(await request.body(), request.headers.get("content-type", ""), batch=False)
        if len(images) != 1:
            raise ServiceError(400, "one_image", f"got {len(images)} files; send one, or use /v1/predict/batch")
        if explain:
            service.require_explainer()
        tta = service.require_ready().use_tta(tta)  # None: the model's own setting; the response says which
        outcomes, ms = await service.classify(images, tta)
        o = outcomes[0]
        if o.error:
            raise o.error
        if o.prediction.refused:  # type: ignore[union-attr]
            return _refusal(o, service)
        p, info = o.prediction, service.predictor.info  # type: ignore[union-attr]
        out = PredictionOut(
            label=p.label,
            probability=p.probability,
            threshold=p.threshold,
            refused=False,  # type: ignore[arg-type]
            ood_score=p.ood_score,
            model_id=info.model_id,
            model_version=service.version,
            inference_ms=round(ms, 3),
            tta=tta,
            disclaimer=DISCLAIMER,
        )
        if explain:
            png = await service.explain(images[0], p.label)  # type: ignore[union-attr]  # the label shown
            out.explanation_png = base64.b64encode(png).decode("ascii")
        return out

    @router.post(
        "/predict/batch",
        response_model=BatchOut,
        openapi_extra=BATCH_BODY,
        responses=_errors("/v1/predict/batch", 400, 401, 413, 415, 503),
    )
    async def predict_batch(request: Request, tta: bool | None = TTA_QUERY) -> BatchOut:
        """Up to 32 images (multipart `files` or JSON `{"images": [...]}`); unreadable ones get a per-item error."""
        images = codec.request_images(await request.body(), request.headers.get("content-type", ""), batch=True)
        if not images:
            raise ServiceError(400, "no_images", "the batch is empty; send 1 to 32 images")
        if len(images) > max_batch:
            raise ServiceError(413, "batch_too_large", f"{len(images)} images; send at most {max_batch} per request")
        tta = service.require_ready().use_tta(tta)  # None: the model's own setting; the response says which
        outcomes, ms = await service.classify(images, tta)
        info = service.predictor.info  # type: ignore[union-attr]
        return BatchOut(
            results=[_batch_item(i, o) for i, o in enumerate(outcomes)],
            threshold=info.threshold,
            model_id=info.model_id,
            model_version=service.version,
            inference_ms=round(ms, 3),
            tta=tta,
            disclaimer=DISCLAIMER,
        )

    @router.get("/model", responses=_errors("/v1/model", 401, 503))
    def model() -> dict:
        """Backbone, training data, metrics with 95% CIs, threshold, input size, licences, intended use."""
        return model_card(service.model_dir, service.require_ready(), service.version)

    return router


def _batch_item(index: int, o: Outcome) -> BatchItem:
    if o.error:
        return BatchItem(index=index, error=o.error.message, status=o.error.status)
    p = o.prediction
    return BatchItem(
        index=index,
        label=p.label,
        probability=p.probability,
        refused=p.refused,  # type: ignore[union-attr,arg-type]
        reason=p.reason,
        ood_score=p.ood_score,
        status=422 if p.refused else 200,
    )  # type: ignore[union-attr]


def page_router() -> APIRouter:
    router = APIRouter()
    html = resources.files("lesionlab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    return router


# ------------------------------------------------------------------ errors


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves in the endpoint's own format; unexpected ones are logged without the request body."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        return error_response(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return error_response(request.url.path, ServiceError(400, "bad_request", f"invalid request ({where})"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(request.url.path, ServiceError(e.status_code, code, str(e.detail), dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected %s on %s %s", type(e).__name__, request.method, request.url.path, exc_info=e)
        return error_response(
            request.url.path,
            ServiceError(500, "internal_error", "unexpected server error; it was logged, please report it"),
        )


# ------------------------------------------------------------------ factory


def create_app(
    model_dir: str | Path | None = None,
    *,
    max_body_bytes: int = 10_000_000,
    max_concurrency: int = 32,
    timeout_s: float = 15.0,
    tokens: Iterable[str] | None = None,
    backend: str = "auto",
    num_threads: int | None = None,
    inference_threads: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = 32,
    load_before_accepting: bool = False,
) -> FastAPI:
    """The app; the model loads in the background at start-up and /health/ready turns 200 once it is warm.

    With ``load_before_accepting`` start-up waits for the warm model instead, so the process takes no
    connection it could only answer with 503 (uvicorn opens the socket after the lifespan start-up)."""
    service = ModelService(
        model_dir,
        backend=backend,
        num_threads=num_threads,
        max_concurrency=max_concurrency,
        timeout_s=timeout_s,
        inference_threads=inference_threads,
        max_pixels=max_pixels,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if load_before_accepting:
            await asyncio.to_thread(service.load)
        service.start()
        yield
        service.stop()

    app = FastAPI(
        title="lesionlab",
        version=__version__,
        lifespan=lifespan,
        description=f"Benign vs malignant skin-lesion classifier. {DISCLAIMER}",
    )
    app.state.service = service
    install_error_handlers(app)
    for router in (health_router(service), study_router(service), v1_router(service, max_batch), page_router()):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, tokens=list(tokens or []))  # outermost: no body is read before auth
    return app


def app_from_settings(s: ServeSettings) -> FastAPI:
    return create_app(
        s.model_dir,
        max_body_bytes=s.max_body_bytes,
        max_concurrency=s.max_concurrency,
        timeout_s=s.timeout_s,
        tokens=s.tokens,
        backend=s.backend,
        num_threads=s.num_threads,
        inference_threads=s.inference_threads,
        max_pixels=s.max_pixels,
        max_batch=s.max_batch,
        load_before_accepting=s.load_before_accepting,
    )


def app_from_env() -> FastAPI:
    """uvicorn factory (``lesionlab.serve.app:app_from_env``) for worker processes."""
    limit_blas_threads()
    return app_from_settings(ServeSettings.from_env(os.environ))
