"""The HTTP service: routes decode requests, the ModelService runs the Predictor, responses encode answers.

Build it with :func:`create_app` (tests, embedding) or let uvicorn build it from the environment with
:func:`app_from_env` (``lesionlab serve --workers N``). The routers live in :mod:`lesionlab.serve.routes`,
the OpenAPI document's schemas in :mod:`lesionlab.serve.openapi`; this module assembles them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lesionlab import __version__
from lesionlab.data.images import DEFAULT_MAX_PIXELS
from lesionlab.disclaimer import DISCLAIMER
from lesionlab.serve.errors import ServiceError
from lesionlab.serve.middleware import BearerAuth, BodyLimit
from lesionlab.serve.openapi import example_image, install_openapi
from lesionlab.serve.responses import error_response
from lesionlab.serve.routes import health_router, page_router, study_router, v1_router
from lesionlab.serve.service import ModelService, limit_blas_threads
from lesionlab.serve.settings import ServeSettings

__all__ = ["app_from_env", "app_from_settings", "create_app", "example_image", "install_error_handlers"]

log = logging.getLogger("lesionlab.serve")


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
    runtime: str = "auto",
    num_threads: int | None = None,
    inference_threads: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = 32,
    load_before_accepting: bool = False,
    backend: str | None = None,
) -> FastAPI:
    """The app; the model loads in the background at start-up and /health/ready turns 200 once it is warm.

    ``runtime`` is the engine that runs the model (auto, onnx or torch); ``backend`` is its deprecated
    name, still accepted with a DeprecationWarning. With ``load_before_accepting`` start-up waits for the
    warm model instead, so the process takes no connection it could only answer with 503 (uvicorn opens
    the socket after the lifespan start-up). ``max_batch`` and ``max_body_bytes`` are also the OpenAPI
    document's ``maxItems`` and ``maxLength``."""
    if backend is not None:
        if runtime not in ("auto", backend):
            raise TypeError(f"create_app got runtime={runtime!r} and backend={backend!r}; pass runtime= only")
        warnings.warn("create_app(backend=...) is deprecated; pass runtime=", DeprecationWarning, stacklevel=2)
        runtime = backend
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    tokens = [t for t in (tokens or []) if t]  # read once: it may be an iterator, and it decides the document
    service = ModelService(
        model_dir,
        backend=runtime,  # ModelService still names it backend
        num_threads=num_threads,
        max_concurrency=max_concurrency,
        timeout_s=timeout_s,
        inference_threads=inference_threads,
        max_pixels=max_pixels,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
    routers = (
        health_router(service),
        study_router(service, max_body_bytes),
        v1_router(service, max_batch, max_body_bytes),
        page_router(),
    )
    for router in routers:
        app.include_router(router)
    install_openapi(app, secured=bool(tokens))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, tokens=tokens)  # outermost: no body is read before auth
    return app


def app_from_settings(s: ServeSettings) -> FastAPI:
    return create_app(
        s.model_dir,
        max_body_bytes=s.max_body_bytes,
        max_concurrency=s.max_concurrency,
        timeout_s=s.timeout_s,
        tokens=s.tokens,
        runtime=s.runtime,
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
