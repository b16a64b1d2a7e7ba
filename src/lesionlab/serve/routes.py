"""The routers: health probes, the study's /predict contract, the /v1 API and the upload page.

Routes decode requests (codec), ask the ModelService and encode answers (responses); their OpenAPI bodies
and declared errors come from :mod:`lesionlab.serve.openapi`.
"""

from __future__ import annotations

import base64
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from lesionlab.disclaimer import DISCLAIMER
from lesionlab.inference.predictor import ModelInfo, Prediction
from lesionlab.serve import codec
from lesionlab.serve.errors import ServiceError
from lesionlab.serve.model_card import model_card
from lesionlab.serve.openapi import batch_body, error_responses, study_body, v1_body
from lesionlab.serve.responses import (
    STUDY_PATH,
    BatchItem,
    BatchOut,
    LiveOut,
    PredictionOut,
    ReadyOut,
    RefusalOut,
    StudyEnvelope,
    label_of,
    study_success,
)
from lesionlab.serve.service import ModelService, Outcome

TTA_QUERY = Query(
    None,
    description="Test-time augmentation: mean over the 8 flips/rotations (8x the compute). "
    "Default: as the model's threshold was fitted (`tta` in GET /v1/model)",
)


def prediction_of(o: Outcome) -> Prediction:
    """The outcome's prediction, or its error raised: an Outcome holds one or the other."""
    if o.error is not None:
        raise o.error
    if o.prediction is None:  # pragma: no cover - classify fills in every outcome without an error
        raise RuntimeError("an outcome with neither a prediction nor an error")
    return o.prediction


def health_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["health"])

    def live() -> LiveOut:
        return LiveOut(status="live", live=True)

    def ready() -> JSONResponse:
        predictor = service.predictor  # service.ready is exactly "predictor is not None"
        body: dict[str, Any] = {"status": service.state, "ready": predictor is not None}
        if predictor is not None:
            body["model_id"] = predictor.info.model_id
        elif service.error:
            body["detail"] = service.error
        return JSONResponse(body, status_code=200 if predictor is not None else 503)

    # the probes are public (BearerAuth lets them through) and read no body, so no 401/400/413 here
    ready_doc: dict[int | str, dict[str, Any]] = {
        503: {"model": ReadyOut, "description": "Model loading, or failed to load (see detail)"}
    }
    for prefix in ("", "/v2"):
        router.add_api_route(f"{prefix}/health/live", live, methods=["GET"], summary="Liveness")
        router.add_api_route(
            f"{prefix}/health/ready",
            ready,
            methods=["GET"],
            response_model=ReadyOut,
            responses=ready_doc,
            summary="Readiness: model loaded and warmed up",
        )
    return router


def study_router(service: ModelService, max_body_bytes: int) -> APIRouter:
    router = APIRouter(tags=["study contract"])

    @router.post(
        STUDY_PATH,
        response_model=StudyEnvelope,
        openapi_extra=study_body(max_body_bytes),
        responses=error_responses(STUDY_PATH, 400, 401, 413, 415, 422, 503),
    )
    async def predict_study(request: Request) -> dict:
        """The study's contract: `{"image": "<base64>"}` (or a bare base64 body) in, a Lambda-style envelope out.

        A refused input answers statusCode 200 with predicted_label `not_a_lesion` and the reason."""
        image = codec.study_image(await request.body())
        p = prediction_of((await service.classify([image]))[0][0])
        return study_success(p, service.require_ready().info, service.version)  # ready: classify answered

    return router


def _refusal(p: Prediction, info: ModelInfo, version: str) -> JSONResponse:
    body = RefusalOut(
        error="not_a_lesion",
        message=f"refused: {p.reason}; send a dermoscopic photo of one lesion",
        probability=p.probability,
        ood_score=p.ood_score,
        diagnoses=p.diagnoses,
        model_id=info.model_id,
        model_version=version,
    )
    return JSONResponse(body.model_dump(), status_code=422)


def v1_router(service: ModelService, max_batch: int, max_body_bytes: int) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["v1"])

    @router.post(
        "/predict",
        response_model=PredictionOut,
        openapi_extra=v1_body(max_body_bytes),
        responses=error_responses("/v1/predict", 400, 401, 413, 415, 422, 501, 503, refusal=True),
    )
    async def predict(
        request: Request,
        tta: bool | None = TTA_QUERY,
        explain: bool = Query(False, description="Add a Grad-CAM overlay (needs model.pt)"),
    ) -> PredictionOut | JSONResponse:
        """One image (multipart `file` or JSON base64): label, P(malignant), threshold, model id/version, timing."""
        images = codec.request_images(await request.body(), request.headers.get("content-type", ""), batch=False)
        if len(images) != 1:
            raise ServiceError(400, "one_image", f"got {len(images)} files; send one, or use /v1/predict/batch")
        if explain:
            service.require_explainer()
        predictor = service.require_ready()
        use_tta = predictor.use_tta(tta)  # None: the model's own setting; the response says which
        outcomes, ms = await service.classify(images, use_tta)
        p = prediction_of(outcomes[0])
        if p.refused:
            return _refusal(p, predictor.info, service.version)
        out = PredictionOut(
            label=label_of(p),
            probability=p.probability,
            threshold=p.threshold,
            refused=False,
            ood_score=p.ood_score,
            model_id=predictor.info.model_id,
            model_version=service.version,
            inference_ms=round(ms, 3),
            tta=use_tta,
            diagnoses=p.diagnoses,
            disclaimer=DISCLAIMER,
        )
        if explain:
            png = await service.explain(images[0], p.label)  # the label shown
            out.explanation_png = base64.b64encode(png).decode("ascii")
        return out

    @router.post(
        "/predict/batch",
        response_model=BatchOut,
        openapi_extra=batch_body(max_batch, max_body_bytes),
        # no 422: a refused or too small image is a per-item status in a 200 answer
        responses=error_responses("/v1/predict/batch", 400, 401, 413, 415, 503),
        description=f'Up to {max_batch} images (multipart `files` or JSON `{{"images": [...]}}`); '
        "unreadable ones get a per-item error.",
    )
    async def predict_batch(request: Request, tta: bool | None = TTA_QUERY) -> BatchOut:
        """Up to ``max_batch`` images; unreadable ones get a per-item error."""
        images = codec.request_images(await request.body(), request.headers.get("content-type", ""), batch=True)
        if not images:
            raise ServiceError(400, "no_images", f"the batch is empty; send 1 to {max_batch} images")
        if len(images) > max_batch:
            # 413, not 400/422: the request is well formed but more than this server is willing to process
            # (RFC 9110 15.5.14), like a body over the cap; the schema's maxItems says the same limit, and
            # clients already branch on this status and code.
            raise ServiceError(413, "batch_too_large", f"{len(images)} images; send at most {max_batch} per request")
        predictor = service.require_ready()
        use_tta = predictor.use_tta(tta)  # None: the model's own setting; the response says which
        outcomes, ms = await service.classify(images, use_tta)
        info = predictor.info
        return BatchOut(
            results=[_batch_item(i, o) for i, o in enumerate(outcomes)],
            threshold=info.threshold,
            model_id=info.model_id,
            model_version=service.version,
            inference_ms=round(ms, 3),
            tta=use_tta,
            disclaimer=DISCLAIMER,
        )

    @router.get("/model", responses=error_responses("/v1/model", 401, 503))
    def model() -> dict:
        """Backbone, training data, metrics with 95% CIs, threshold, input size, licences, intended use."""
        return model_card(service.model_dir, service.require_ready(), service.version)

    return router


def _batch_item(index: int, o: Outcome) -> BatchItem:
    if o.error is not None:
        return BatchItem(index=index, error=o.error.message, status=o.error.status)
    p = prediction_of(o)
    return BatchItem(
        index=index,
        label=label_of(p),
        probability=p.probability,
        refused=p.refused,
        reason=p.reason,
        ood_score=p.ood_score,
        diagnoses=p.diagnoses,
        status=422 if p.refused else 200,
    )


def page_router() -> APIRouter:
    router = APIRouter()
    html = resources.files("lesionlab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    return router
