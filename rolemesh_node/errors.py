"""OpenAI-style error answers: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import json
from typing import Any

# status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "unavailable_error",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str | None = None, type_: str | None = None) -> bytes:
    """The JSON body of an error answer."""
    return json.dumps({"error": {
        "message": message,
        "type": type_ or ERROR_TYPES.get(status, "server_error"),
        "code": code,
    }}).encode()


def set_error(request: Any, status: int, message: str, code: str | None = None,
              type_: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    """Set status and headers on a twisted.web request; return the body to write.

    The code and message stay on the request (``rolemesh_error``) for what
    counts answers when it ends (``/metrics``, the status page's errors)."""
    request.rolemesh_error = (code, message)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return error_body(status, message, code, type_)
