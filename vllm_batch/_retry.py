"""Retries: one policy, applied by tenacity around every HTTP call the sync and async clients make.

Retried: connection errors, timeouts, 429 and 5xx — the failures that a later attempt can fix. A 429 or 503
with `Retry-After` (or `retry-after-ms`) waits what the server asked, up to `max_retry_after`; otherwise the
wait doubles from `initial_backoff` up to `max_backoff`, with jitter so many clients do not retry in step.
Anything else, and the last failure once attempts run out, is translated into our own exception types.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import tenacity

from vllm_batch._errors import (
    APIConnectionError,
    APIError,
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


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    # APITimeoutError is a subclass of APIConnectionError; httpx errors escape while a download streams.
    return isinstance(exc, openai.APIConnectionError | httpx.TransportError)


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


class _Backoff(tenacity.wait.wait_base):
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after(exc) if exc is not None else None
        if asked is not None:
            return min(asked, self.policy.max_retry_after)
        base = min(
            self.policy.max_backoff, self.policy.initial_backoff * 2 ** (retry_state.attempt_number - 1)
        )
        return min(self.policy.max_backoff, base * (1 + self.policy.jitter * random.random()))


def _common(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "stop": tenacity.stop_after_attempt(max(1, policy.max_attempts)),
        "wait": _Backoff(policy),
        "retry": tenacity.retry_if_exception(is_retryable),
        "reraise": True,  # the last real exception, not tenacity's RetryError; translate() then maps it
    }


def retrying(policy: RetryPolicy, sleep: Callable[[float], None]) -> tenacity.Retrying:
    return tenacity.Retrying(sleep=sleep, **_common(policy))


def async_retrying(policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]]) -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(sleep=sleep, **_common(policy))


def translate(exc: BaseException) -> BaseException:
    """Our exception for an openai/httpx one (anything else is returned unchanged)."""
    if isinstance(exc, VLLMBatchError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
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
        )
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {exc}")
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        cause = exc.__cause__ or exc
        return APIConnectionError(f"cannot reach the server: {cause}")
    if isinstance(exc, openai.OpenAIError):
        return APIError(str(exc))
    return exc
