"""Reading and checking request parameters, each failure a 400 that names the parameter."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from vllm_batch_server.api.errors import bad_request, not_found

# OpenAI's bounds for `expires_after` / `output_expires_after`: one hour to thirty days.
MIN_EXPIRY, MAX_EXPIRY = 3600, 2_592_000


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"Invalid '{name}': expected an integer, got {raw[:50]!r}.", name) from None
    if not low <= value <= high:
        raise bad_request(f"Invalid '{name}': must be between {low} and {high}.", name)
    return value


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


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def expiry_seconds(anchor: Any, seconds: Any, param: str) -> int:
    """Validate an OpenAI expiry policy `{anchor: "created_at", seconds: N}`."""
    if anchor != "created_at":
        raise bad_request(f"Invalid '{param}.anchor': only 'created_at' is supported.", f"{param}.anchor")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise bad_request(f"Invalid '{param}.seconds': expected an integer.", f"{param}.seconds") from None
    if isinstance(seconds, bool) or not MIN_EXPIRY <= value <= MAX_EXPIRY:
        raise bad_request(f"Invalid '{param}.seconds': must be between {MIN_EXPIRY} and {MAX_EXPIRY}.",
                          f"{param}.seconds")
    return value
