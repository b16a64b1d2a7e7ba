"""Two ASGI layers in front of the routes: bearer-token auth, then a request-body cap enforced while reading.

Both answer before a route runs, so an unauthenticated or oversized request costs no decoding.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lesionlab.serve.errors import ServiceError
from lesionlab.serve.responses import error_response

PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})


class BodyLimit:
    """413 as soon as the declared or streamed (chunked) body passes ``max_bytes``; the body is then replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ServiceError:
        return ServiceError(
            413,
            "body_too_large",
            f"request body exceeds {self.max_bytes:,} bytes; send a smaller "
            "image (resize to ~1000 px; the model sees 224 px)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                err = ServiceError(400, "bad_content_length", "Content-Length is not a number")
                return await error_response(path, err)(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await error_response(path, self._too_large())(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await error_response(path, self._too_large())(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BearerAuth:
    """With tokens configured, every path except the health probes needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, tokens: Iterable[str]):
        self.app = app
        self.tokens = [t.encode() for t in tokens if t]

    def _authorized(self, header: bytes | None) -> bool:
        if not header or header[:7].lower() != b"bearer ":
            return False
        given = header[7:].strip()
        # compare against every token, always, so timing says nothing about which prefix matched
        return any([hmac.compare_digest(given, t) for t in self.tokens])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        if self._authorized(dict(scope["headers"]).get(b"authorization")):
            return await self.app(scope, receive, send)
        err = ServiceError(
            401,
            "unauthorized",
            "missing or invalid bearer token; send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": "Bearer"},
        )
        await error_response(scope["path"], err)(scope, receive, send)


def read_tokens(env: dict[str, str]) -> list[str]:
    """Tokens from LESIONLAB_API_TOKENS (comma-separated) and/or the file named by LESIONLAB_API_TOKENS_FILE."""
    tokens = [t.strip() for t in env.get("LESIONLAB_API_TOKENS", "").split(",") if t.strip()]
    path = env.get("LESIONLAB_API_TOKENS_FILE")
    if path:
        with open(path) as f:
            tokens += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tokens
