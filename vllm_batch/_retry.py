"""Retries: one policy, applied by the core (`_core.py`) around every HTTP operation, sync or async alike.

Retried: connection errors, timeouts, 429 and 5xx — the failures that a later attempt can fix. A 429 or 503
with `Retry-After` (or `retry-after-ms`) waits what the server asked, up to `max_retry_after`; otherwise the
wait doubles from `initial_backoff` up to `max_backoff`, with jitter so many clients do not retry in step.
The shells translate every openai/httpx failure into our own exception types (`translate`) before the core
sees it, so the decision is made on one set of types.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from vllm_batch._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    VLLMBatchError,
    status_error_class,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. `max_attempts` counts the first try; 1 disables retrying."""

    max_attempts: int = 6
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    jitter: float = 0.2  # each wait is stretched by up to this fraction, at random

    def delay(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before attempt `attempt + 1` after `error`, or None to give up."""
        if not isinstance(error, APIError) or not error.retryable or attempt >= max(1, self.max_attempts):
            return None
        asked = error.retry_after if isinstance(error, APIStatusError) else None
        if asked is not None:
            return min(asked, self.max_retry_after)
        base = min(self.max_backoff, self.initial_backoff * 2.0 ** (attempt - 1))
        return min(self.max_backoff, base * (1 + self.jitter * random.random()))


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `Retry-After` (seconds or HTTP date)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, httpx.Response):
        return None
    headers = response.headers
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reason(exc: BaseException) -> str:
    """What went wrong on the wire, as a short text ("[Errno 111] Connection refused"): the httpx error under
    the openai SDK's wrapper."""
    if isinstance(exc, openai.OpenAIError) and isinstance(exc.__cause__, httpx.HTTPError | OSError):
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def translate(exc: BaseException, base_url: str) -> BaseException:
    """Our exception for an openai/httpx one (anything else is returned unchanged)."""
    if isinstance(exc, VLLMBatchError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        body: Any = exc.body
        message, code, param = None, exc.code, exc.param
        if isinstance(body, dict):
            message = body.get("message")
            code = code or body.get("code")
            param = param or body.get("param")
        if not message:
            try:
                message = exc.response.text.strip() or exc.response.reason_phrase
            except Exception:
                message = exc.message
        cls = status_error_class(exc.status_code)
        return cls(
            str(message),
            status_code=exc.status_code,
            code=code if isinstance(code, str) else None,
            param=param if isinstance(param, str) else None,
            body=body,
            request_id=exc.response.headers.get("x-request-id"),
            retry_after=retry_after(exc),
        )
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return APITimeoutError(f"{base_url} did not answer in time ({_reason(exc)})")
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return APIConnectionError(f"cannot reach {base_url} ({_reason(exc)})")
    if isinstance(exc, openai.OpenAIError):
        return APIError(str(exc))
    return exc
