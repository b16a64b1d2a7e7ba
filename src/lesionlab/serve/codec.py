"""Request bodies -> image bytes, entirely in memory (uploads never touch the disk or the logs).

Accepted shapes: the study's JSON ``{"image": "<base64>"}``, a bare base64 string (how API Gateway
passes a body), a JSON string, ``data:image/...;base64,`` prefixes, multipart uploads and, for the
batch endpoint, ``{"images": [...]}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import TYPE_CHECKING

from lesionlab.serve.errors import ServiceError

if TYPE_CHECKING:  # python_multipart defines its callback TypedDict for type checkers only
    from python_multipart.multipart import MultipartCallbacks

_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")
_B64 = "[A-Za-z0-9+/_-]"

#: The base64 text the OpenAPI document promises to read (an ECMA-262 regex, as JSON Schema's ``pattern``):
#: an optional ``data:...;base64,`` prefix, then standard or URL-safe base64 of at least one byte, padded
#: or not. Every string it matches decodes (:func:`decode_base64`) to non-empty bytes, so a schema-valid
#: request is never answered 400 for its encoding. :func:`decode_base64` also reads more than this (line
#: breaks and spaces, an upper-case ``DATA:`` prefix); the pattern stays the plain form a client should send.
BASE64_PATTERN = (
    r"^(data:[A-Za-z0-9.+/-]*(;[A-Za-z0-9=.+-]+)*;base64,)?"
    rf"({_B64}{{4}})*({_B64}{{4}}|{_B64}{{3}}=?|{_B64}{{2}}(==?)?)$"
)


def decode_base64(text: str | bytes, label: str = "image") -> bytes:
    """Standard or URL-safe base64, with or without padding, line breaks or a data: URI prefix."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise _bad_base64(label, "it contains non-ASCII characters") from None
    text = _WHITESPACE.sub(b"", text)
    match = _DATA_URI.match(text.decode("ascii", "replace"))
    if match:
        text = text[match.end() :]
    if not text:
        raise ServiceError(400, "empty_image", f"{label}: no image data; send the image bytes as base64")
    text += b"=" * (-len(text) % 4)
    alphabet = b"-_" if (b"-" in text or b"_" in text) else b"+/"
    try:
        return base64.b64decode(text, altchars=alphabet, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad_base64(label, str(e)) from None


def _bad_base64(label: str, why: str) -> ServiceError:
    return ServiceError(
        400, "bad_base64", f'{label} is not valid base64 ({why}); send {{"image": "<base64 of the JPEG/PNG file>"}}'
    )


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServiceError(400, "bad_json", f'body is not valid JSON ({e}); send {{"image": "<base64>"}}') from None
    except RecursionError:
        raise ServiceError(400, "bad_json", 'JSON nested too deeply; send {"image": "<base64>"}') from None


def _looks_textual(raw: bytes) -> bool:
    return raw.isascii() and not raw.startswith((b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"RIFF"))


def _image_field(obj, key: str = "image") -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get(key), str):
        return obj[key]
    raise ServiceError(400, "missing_image", f'JSON body needs a string field "{key}" holding the base64 image')


def study_image(raw: bytes) -> bytes:
    """The /predict body: JSON object or string, a bare base64 text, or (leniently) the raw image bytes."""
    stripped = raw.strip()
    if not stripped:
        raise ServiceError(400, "empty_body", 'empty body; send {"image": "<base64>"}')
    if stripped[:1] in (b"{", b'"', b"["):
        return decode_base64(_image_field(_parse_json(stripped)))
    if _looks_textual(stripped):
        return decode_base64(stripped)
    return raw


def json_images(raw: bytes) -> list[bytes]:
    """The batch JSON body ``{"images": ["<base64>", ...]}``."""
    obj = _parse_json(raw)
    items = obj.get("images") if isinstance(obj, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ServiceError(400, "missing_images", 'JSON body needs "images": a list of base64 strings')
    return [decode_base64(s, f"images[{i}]") for i, s in enumerate(items)]


def multipart_files(body: bytes, content_type: str) -> list[bytes]:
    """The file parts of a multipart/form-data body, parsed in memory (no spooling to temp files)."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "bad_multipart", "multipart body without a boundary in Content-Type")
    parts: list[dict] = []
    header: dict[str, bytearray] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def on_header_end() -> None:
        name = bytes(header.pop("field", b"")).decode("latin-1").lower()
        parts[-1]["headers"][name] = bytes(header.pop("value", b"")).decode("latin-1")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].extend(data[start:end])

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as e:
        raise ServiceError(400, "bad_multipart", f"malformed multipart body ({e})") from None
    return [bytes(p["data"]) for p in parts if "filename=" in p["headers"].get("content-disposition", "")]


def request_images(body: bytes, content_type: str, batch: bool) -> list[bytes]:
    """Image bytes of a /v1 request: multipart file parts, or JSON with "image" (single) or "images"."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        files = multipart_files(body, content_type)
        if not files:
            raise ServiceError(
                400,
                "missing_file",
                "multipart body holds no file part; upload the image as a file field (curl -F file=@photo.jpg)",
            )
        return files
    if kind in ("application/json", "text/plain", ""):
        if batch:
            return json_images(body)
        return [decode_base64(_image_field(_parse_json(body)))]
    raise ServiceError(
        415,
        "unsupported_media_type",
        f"Content-Type {kind!r} is not accepted; use multipart/form-data or application/json",
    )
