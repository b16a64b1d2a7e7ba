"""AWS Lambda entry point behind API Gateway (proxy integration), answering the study's envelope.

Set the handler to ``lesionlab.serve.aws_lambda.handler``; ``LESIONLAB_MODEL`` picks the model folder
(default: the bundled model). The model loads once per container, on the first event.
API Gateway requires ``body`` to be a string, so the envelope's body is JSON-encoded here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lesionlab.serve.codec import decode_base64, study_image
from lesionlab.serve.errors import ServiceError
from lesionlab.serve.responses import STUDY_PATH, error_payload, study_success
from lesionlab.serve.service import ModelService, limit_blas_threads
from lesionlab.serve.settings import ServeSettings

_loaded: tuple[ModelService, ServeSettings] | None = None


def _get_service() -> tuple[ModelService, ServeSettings]:
    """One ModelService per container: cold start pays the load, warm invocations reuse it."""
    global _loaded
    if _loaded is None:
        limit_blas_threads()
        s = ServeSettings.from_env(os.environ)
        service = ModelService(s.model_dir, backend=s.runtime, num_threads=s.num_threads, max_pixels=s.max_pixels)
        service.load()
        _loaded = service, s
    return _loaded


def event_body(event: Any) -> bytes:
    """The raw request body of a proxy event (REST or HTTP API), honouring ``isBase64Encoded``.

    A direct invocation with ``{"image": "<base64>"}`` (no ``body``) is accepted too.
    """
    if not isinstance(event, dict):
        raise ServiceError(400, "bad_event", "the event is not a JSON object; send an API Gateway proxy event")
    if "body" not in event:
        if isinstance(event.get("image"), str):
            return json.dumps({"image": event["image"]}).encode()
        raise ServiceError(400, "empty_body", 'the event has no body; send {"image": "<base64>"}')
    body = event["body"]
    if isinstance(body, dict):  # consoles and test tools sometimes pass the body already parsed
        return json.dumps(body).encode()
    if not isinstance(body, str) or not body:
        raise ServiceError(400, "empty_body", 'the request body is empty; send {"image": "<base64>"}')
    if event.get("isBase64Encoded"):
        return decode_base64(body, "body (isBase64Encoded)")
    return body.encode("utf-8")


def _answer(event: Any, service: ModelService, max_body_bytes: int) -> dict:
    try:
        raw = event_body(event)
        if len(raw) > max_body_bytes:
            raise ServiceError(
                413, "body_too_large", f"request body exceeds {max_body_bytes:,} bytes; send a smaller image"
            )
        service.require_ready()
        # tta None: as the operating point was fitted, like POST /predict (its threshold belongs to those scores)
        outcome = service.classify_blocking([study_image(raw)], None)[0][0]
        if outcome.error:
            raise outcome.error
        return study_success(outcome.prediction, service.predictor.info, service.version)  # type: ignore[arg-type,union-attr]
    except ServiceError as e:
        return error_payload(STUDY_PATH, e)


def handler(event: Any, context: Any = None) -> dict:
    """API Gateway proxy event in, ``{"statusCode", "headers", "body": "<JSON>"}`` out."""
    service, settings = _get_service()
    envelope = _answer(event, service, settings.max_body_bytes)
    return {**envelope, "body": json.dumps(envelope["body"]), "isBase64Encoded": False}
