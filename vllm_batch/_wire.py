"""What the two shells (`_sync.py`, `_async.py`) share about the wire, so that neither needs the other: the
timeouts, and how a vllm-batch server extension's request (`_ops.ApiRequest`) is handed to the openai SDK's
generic request methods and its answer read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from vllm_batch._ops import ApiRequest

DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
HEALTH_TIMEOUT = 5.0


def extension_kwargs(request: ApiRequest, headers: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments for `client.get/post/put/delete(request.path, ...)`."""
    # As the SDK's own resources ask: the API key only (the default would add an empty admin key). `headers`
    # are the batch's own per-request headers (what must not ride along to this host, or no key at all).
    sent = {**headers, "Idempotency-Key": request.idempotency_key} if request.idempotency_key else dict(headers)
    options: dict[str, Any] = {"security": {"bearer_auth": True}, "headers": sent}
    if request.params:
        options["params"] = dict(request.params)
    kwargs: dict[str, Any] = {"cast_to": httpx.Response, "options": options}
    if request.body is not None:
        kwargs["body"] = dict(request.body)
    return kwargs


def extension_answer(request: ApiRequest, response: httpx.Response) -> Any:
    if request.lines:
        return response.content.splitlines(keepends=True), dict(response.headers)
    return response.json()
