"""Reading and checking request parameters, each failure a 400 that names the parameter."""

from __future__ import annotations

import math
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request

from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import APIError, bad_request, not_found
from vllm_batch_server.store import jsonl

# OpenAI's bounds for `expires_after` / `output_expires_after`: one hour to thirty days.
MIN_EXPIRY, MAX_EXPIRY = 3600, 2_592_000

_DIGITS = re.compile(r"\s*[+-]?[0-9]+\s*")
# More digits than any bound of ours has: out of range without converting (int() of thousands of digits is slow,
# and past 4,300 it raises).
_MAX_DIGITS = 30


def integer(value: Any, param: str, low: int, high: int) -> int:
    """An integer parameter, from JSON (an int, or a float without a fraction such as 3600.0) or from text (a
    query string or a form field: decimal digits). Anything else, a boolean, a fraction, NaN, an infinity, a
    number too large for any bound, is a 400 naming the parameter, never an OverflowError."""
    number: int
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad_request(f"Invalid '{param}': expected an integer, got {_kind(value)}.", param)
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise bad_request(f"Invalid '{param}': expected an integer, got {value[:50]!r}.", param)
        digits = value.strip().lstrip("+-")
        if len(digits.lstrip("0")) > _MAX_DIGITS:
            raise _out_of_range(param, low, high)
        number = int(value)
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise bad_request(f"Invalid '{param}': expected an integer, got {value!r}.", param)
        if not low <= value <= high:  # compared as a float: 1e300 never becomes a 300-digit int
            raise _out_of_range(param, low, high)
        number = int(value)
    else:
        number = value
    if not low <= number <= high:
        raise _out_of_range(param, low, high)
    return number


def _kind(value: Any) -> str:
    names = {bool: "a boolean", type(None): "null", dict: "an object", list: "an array"}
    return names.get(type(value), type(value).__name__)


def _out_of_range(param: str, low: int, high: int) -> APIError:
    return bad_request(f"Invalid '{param}': must be between {low} and {high}.", param)


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    return default if raw is None else integer(raw, name, low, high)


def query_choice(request: Request, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = request.query_params.get(name, default)
    if value not in choices:
        raise bad_request(f"Invalid '{name}': expected one of {', '.join(choices)}.", name)
    return value


def checked_id(value: str, valid: bool, kind: str) -> str:
    """An id from the URL that does not even look like one of ours is simply not found."""
    if not valid:
        raise not_found(kind, value)
    return value


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the maximum of {limit} bytes this server accepts.",
                    code="request_too_large")


def declared_length(request: Request) -> int | None:
    """The Content-Length the client declared, if it is a number (the HTTP parser has checked the framing)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        return None
    return int(declared) if len(declared) <= 18 else 10**18


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refusing one over `limit` bytes with a 413 before holding more than that: at once
    from Content-Length, or as soon as a chunked body crosses the limit."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise body_too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise body_too_large(limit)
    except ClientDisconnect:
        raise bad_request("The client disconnected before the request body was complete.",
                          code="client_disconnected") from None
    return bytes(body)


def is_json_type(content_type: str) -> bool:
    """`application/json` or a `+json` type (parameters such as charset aside)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_json_type(request: Request) -> None:
    """JSON routes take JSON content types only: an HTML form (text/plain, urlencoded, multipart) cannot post to
    them (api/guard.py). A request without a Content-Type is taken as JSON (hand-written clients)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and content_type.strip() and not is_json_type(content_type):
        raise APIError(415, f"Unsupported Content-Type '{content_type[:100]}': this route takes a JSON body, sent "
                       "as application/json.", code="unsupported_media_type")


async def json_object(request: Request, limit: int | None = None) -> dict[str, Any]:
    """The request's JSON object body, read with a size limit (default: the `max_json_bytes` setting) and parsed
    strictly as JSON is defined: NaN, Infinity and numbers that overflow (1e999) are refused. Only with a JSON
    content type (415 otherwise)."""
    check_json_type(request)
    raw = await read_body(request, context(request).settings.max_json_bytes if limit is None else limit)
    try:
        body = jsonl.loads(raw)
    except jsonl.TooDeep as exc:
        raise bad_request(f"The request body is valid JSON, but its {exc}, which this server does not accept.",
                          code="invalid_json") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise bad_request(f"The request body is not valid JSON: {str(exc)[:200]}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def expiry_seconds(anchor: Any, seconds: Any, param: str) -> int:
    """Validate an OpenAI expiry policy `{anchor: "created_at", seconds: N}` (from JSON or from form fields)."""
    if anchor != "created_at":
        raise bad_request(f"Invalid '{param}.anchor': only 'created_at' is supported.", f"{param}.anchor")
    return integer(seconds, f"{param}.seconds", MIN_EXPIRY, MAX_EXPIRY)
