"""OpenAI's error shape for every failure, and the handlers that guarantee it.

Every error body is `{"error": {"message", "type", "param", "code"}}`. Client errors carry
`x-should-retry: false` so the official SDK does not retry what cannot succeed (it would retry 408/409/429);
408 (a stalled upload was cut off) and 429 can succeed when retried, so they do not.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vllm_batch_server.exhaustion import Exhausted, exhausted

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 429 or 503
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_response(status: int, message: str, *, type: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": type, "param": param, "code": code}}
    merged = dict(headers or {})
    if 400 <= status < 500 and status not in (408, 429):
        merged["x-should-retry"] = "false"
    return JSONResponse(body, status_code=status, headers=merged)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No such {kind}: '{object_id[:100]}'", param="id", code=f"{kind.lower()}_not_found")


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                          headers=exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
        code: str | None = "unknown_url"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    headers = dict(exc.headers or {})
    return error_response(exc.status_code, message, type=_TYPES.get(exc.status_code, "invalid_request_error"),
                          code=code, headers=headers)


def insufficient_storage() -> JSONResponse:
    return error_response(507, "The server is out of disk space and cannot store this request; nothing was "
                          "stored. Retry once space has been freed.", type="server_error",
                          code="insufficient_storage")


def server_overloaded(reason: Exhausted) -> JSONResponse:
    return error_response(503, f"The server is {reason.value} and could not handle this request; nothing was "
                          "stored. Retry in a moment.", type="server_error", code="server_overloaded",
                          headers={"retry-after": "5"})


async def on_storage_error(request: Request, exc: Exception) -> Response:
    """OSError and SQLite errors: running out of a resource of ours is the operator's to fix and the caller's
    to retry later, so it gets its own status (507 for disk, 503 for descriptors and memory) and message;
    anything else is an unexpected error."""
    reason = exhausted(exc)
    if reason is None:
        return await on_unexpected(request, exc)
    log.error("%s on %s %s: %s", reason.value, request.method, request.url.path, exc)
    return insufficient_storage() if reason is Exhausted.DISK else server_overloaded(reason)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    # A bug of ours, never the caller's input: log it whole, answer in the API's shape without internals.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "The server had an error while processing your request.", type="server_error")
