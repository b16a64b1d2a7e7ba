"""The one error type of the service: an HTTP status, a short machine code and a message saying what to do."""

from __future__ import annotations

from lesionlab.data.images import BadImageError

#: ``BadImageError.status`` -> (status, code). Statuses not listed (404 for a missing file) cannot come from bytes.
IMAGE_ERRORS = {400: "empty_image", 413: "image_too_large", 415: "unsupported_image", 422: "image_too_small"}


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def from_bad_image(e: BadImageError, label: str = "image") -> ServiceError:
    """Maps the decoder's verdict to HTTP; the reason never contains pixel data, only sizes and formats."""
    status = e.status if e.status in IMAGE_ERRORS else 415
    return ServiceError(status, IMAGE_ERRORS[status], f"{label}: {e.reason}")
