"""Response encoding: the study's Lambda-style envelope on /predict, flat JSON everywhere else.

The study's clients read ``statusCode`` and ``body`` from the JSON; the HTTP status always equals
``statusCode`` so plain HTTP clients see the same answer.
"""

from __future__ import annotations

from typing import Literal, cast

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from lesionlab.disclaimer import DISCLAIMER
from lesionlab.inference.predictor import ModelInfo, Prediction
from lesionlab.serve.codec import BASE64_PATTERN
from lesionlab.serve.errors import ServiceError

STUDY_PATH = "/predict"
JSON_HEADERS = {"Content-Type": "application/json"}
Label = Literal["benign", "malignant", "not_a_lesion"]


# ------------------------------------------------------------------ schemas (also the OpenAPI document)


class StudyRequest(BaseModel):
    """The JSON request of /predict and /v1/predict (the app adds ``maxLength`` from its body cap)."""

    image: str = Field(
        description="The image file (JPEG, PNG, BMP, GIF, TIFF, WebP) as base64, standard or URL-safe, padded or "
        "not; a data:image/...;base64, prefix is fine",
        min_length=2,  # the shortest base64 of one byte: an empty string is no image
        pattern=BASE64_PATTERN,
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/*"},
    )


class StudyBody(BaseModel):
    predicted_label: Label
    probability: float = Field(description="Calibrated probability of malignant")
    threshold: float
    model_id: str
    model_version: str
    reason: str | None = Field(default=None, description="Why the image was refused (predicted_label not_a_lesion)")
    disclaimer: str


class StudyEnvelope(BaseModel):
    statusCode: int
    headers: dict[str, str]
    body: StudyBody


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. bad_base64, unsupported_image, busy")
    message: str = Field(description="What was wrong and what to do")


class StudyErrorEnvelope(BaseModel):
    statusCode: int
    headers: dict[str, str]
    body: ErrorBody


class PredictionOut(BaseModel):
    label: Label
    probability: float = Field(description="Calibrated probability of malignant")
    threshold: float
    refused: bool = False
    reason: str | None = None
    ood_score: float | None = None
    model_id: str
    model_version: str
    inference_ms: float
    tta: bool = False
    explanation_png: str | None = Field(default=None, description="Grad-CAM overlay, base64 PNG (explain=true)")
    diagnoses: dict[str, float] | None = Field(
        default=None,
        description="A diagnosis model's calibrated P(diagnosis) per class (taxonomy codes, e.g. mel, nv); the "
        "malignant ones sum to probability. null for a binary model",
    )
    disclaimer: str


class BatchItem(BaseModel):
    index: int
    label: Label | None = None
    probability: float | None = None
    refused: bool = False
    reason: str | None = None
    ood_score: float | None = None
    diagnoses: dict[str, float] | None = Field(
        default=None,
        description="A diagnosis model's calibrated P(diagnosis) per class (taxonomy codes, e.g. mel, nv); the "
        "malignant ones sum to probability. null for a binary model",
    )
    error: str | None = None
    status: int = 200


class BatchOut(BaseModel):
    results: list[BatchItem]
    threshold: float
    model_id: str
    model_version: str
    inference_ms: float
    tta: bool = False
    disclaimer: str


class RefusalOut(ErrorBody):
    """/v1/predict's 422 for an image the lesion detector refused (error ``not_a_lesion``)."""

    label: Label = "not_a_lesion"
    probability: float
    ood_score: float | None = None
    diagnoses: dict[str, float] | None = Field(default=None, description="As in /v1/predict's answer")
    model_id: str
    model_version: str


class LiveOut(BaseModel):
    status: Literal["live"]
    live: bool


class ReadyOut(BaseModel):
    """/health/ready: 200 with ``model_id`` once ready, 503 while loading or after a failed load (``detail``)."""

    status: Literal["ready", "loading", "failed"]
    ready: bool
    model_id: str | None = None
    detail: str | None = Field(default=None, description="Why the model failed to load")


# ------------------------------------------------------------------ encoders


def label_of(p: Prediction) -> Label:
    """``p.label`` as the schemas' Literal: the Predictor only makes these three, and the models still check it."""
    return cast(Label, p.label)


def study_success(p: Prediction, info: ModelInfo, version: str) -> dict:
    """statusCode 200 also for a refusal: the study's clients branch on predicted_label."""
    body = StudyBody(
        predicted_label=label_of(p),
        probability=p.probability,
        threshold=p.threshold,
        model_id=info.model_id,
        model_version=version,
        reason=p.reason,
        disclaimer=DISCLAIMER,
    )
    return {"statusCode": 200, "headers": JSON_HEADERS, "body": body.model_dump()}


def error_payload(path: str, err: ServiceError) -> dict:
    body = {"error": err.code, "message": err.message}
    if path.rstrip("/") == STUDY_PATH:
        return {"statusCode": err.status, "headers": JSON_HEADERS, "body": body}
    return body


def error_response(path: str, err: ServiceError) -> JSONResponse:
    return JSONResponse(error_payload(path, err), status_code=err.status, headers=err.headers)


def error_schema(path: str) -> type[BaseModel]:
    return StudyErrorEnvelope if path == STUDY_PATH else ErrorBody
