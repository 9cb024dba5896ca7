"""The exceptions the client raises.

Everything derives from `VLLMBatchError`, so `except VLLMBatchError` catches any failure of ours. HTTP
failures that survive the retries surface as `APIStatusError` (or a subclass named after the status)
carrying the server's own message, code and param — never the openai SDK's exception types, which would
tie callers to that dependency.
"""

from __future__ import annotations

from typing import Any


class VLLMBatchError(Exception):
    """Base class of every error raised by vllm_batch."""


class ConfigurationError(VLLMBatchError):
    """The provider, base URL or API key is missing or inconsistent."""


class BatchValidationError(VLLMBatchError, ValueError):
    """A request was rejected before anything was sent.

    `field` names the offending part of the request (for example `messages.0.role`, `model`, `custom_id`),
    `index` its position in the batch (from 0) and, for requests read from a JSONL file, `line` its line
    (from 1, as editors count) and `source` the file, so a caller can point at the exact input.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        index: int | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        where = []
        if source is not None:
            where.append(source)
        if line is not None:
            where.append(f"line {line}")
        elif index is not None:
            where.append(f"request at index {index}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.field = field
        self.index = index
        self.line = line
        self.source = source
        self.reason = message

    def at_line(self, line: int, source: str | None = None) -> BatchValidationError:
        """The same error, placed on a line (counted from 1) of a JSONL file."""
        return BatchValidationError(self.reason, field=self.field, index=self.index, line=line, source=source)


class BatchStateError(VLLMBatchError):
    """The operation does not fit the batch's state (adding after submit, downloading before submit, ...)."""


class APIError(VLLMBatchError):
    """A request to the Batch API failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether a later attempt can succeed (the client retries these itself before raising them)."""
        return False


class APIConnectionError(APIError):
    """The server could not be reached, even after retrying."""

    @property
    def retryable(self) -> bool:
        return True


class APITimeoutError(APIConnectionError):
    """The server did not answer in time, even after retrying."""


class APIStatusError(APIError):
    """The server answered with an error status. `message`, `code` and `param` are the server's own."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        param: str | None = None,
        body: Any = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.param = param
        self.body = body
        self.request_id = request_id
        # Seconds the server asked us to wait before trying again (Retry-After / retry-after-ms).
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status_code == 429 or self.status_code >= 500

    def __str__(self) -> str:
        extra = f" ({self.code})" if self.code else ""
        return f"HTTP {self.status_code}{extra}: {self.message}"


class BadRequestError(APIStatusError):
    """400: the server rejected the request (for example an invalid input file)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong for this host."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: no such batch or file."""


class ConflictError(APIStatusError):
    """409: the batch cannot change that way now (for example cancelling a finished batch)."""


class RateLimitError(APIStatusError):
    """429 after every retry was spent."""


class InternalServerError(APIStatusError):
    """5xx after every retry was spent."""


class BatchFailedError(VLLMBatchError):
    """The server failed the batch (e.g. its input did not validate). `errors` are the server's reasons.

    `batch_id` is the server batch that failed: in a sharded batch or a comparison, the failed shard (and
    `model` its model in a comparison), not the first one.
    """

    def __init__(
        self, batch_id: str, errors: list[dict[str, Any]], status: Any = None, *, model: str | None = None
    ) -> None:
        reasons = "; ".join(
            (f"line {e['line']}: " if e.get("line") is not None else "")
            + str(e.get("message") or e.get("code"))
            for e in errors[:5]
        )
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        which = f"batch {batch_id}" + (f" (model {model})" if model else "")
        super().__init__(f"{which} failed: {reasons or 'no reason given'}{more}")
        self.batch_id = batch_id
        self.model = model
        self.errors = errors
        self.status = status


class BatchTimeoutError(VLLMBatchError, TimeoutError):
    """`wait(timeout=...)` ran out. The batch keeps running on the server; `resume(batch_id)` picks it up."""

    def __init__(self, batch_id: str, timeout: float, status: Any = None) -> None:
        super().__init__(
            f"batch {batch_id} did not finish within {timeout:g} s (it keeps running on the server)"
        )
        self.batch_id = batch_id
        self.timeout = timeout
        self.status = status


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    if status_code >= 500:
        return InternalServerError
    return _STATUS_CLASSES.get(status_code, APIStatusError)
