"""The contract between the scheduler and whatever computes a request.

The scheduler and runner know nothing of vLLM: they hand an engine one OpenAI request body at a time and get
back the HTTP status and body that an OpenAI-compatible server would have answered. That keeps the durable
part of the system testable at full speed with the echo engine, and keeps vLLM's version drift in one module.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# The endpoints a batch (or an online request) may target; the API refuses any other.
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
SCORE = "/v1/score"  # vLLM's extension, as `vllm serve` and `vllm run-batch` take it
RERANK = "/v1/rerank"  # vLLM's extension (Jina/Cohere-style rerank)
SUPPORTED_ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, SCORE, RERANK)
# The endpoints that answer `"stream": true` with server-sent events (online requests only).
STREAMING_ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES)


# The largest token count taken as one: anything above is no real count (and would not fit SQLite's integers).
MAX_TOKEN_COUNT = 2**53

# Usage fields an engine or backend gave that were not non-negative whole numbers (NaN, strings, negatives, null
# where a count belongs), each counted as 0. Process-wide; GET /metrics reads it (vllm_batch_odd_usage_fields).
odd_usage_fields = 0


def _count(value: Any) -> int:
    """A token count as given, or 0 (counted in `odd_usage_fields`) when it is not a non-negative whole number.
    A missing field is no oddity: OpenAI leaves out what does not apply."""
    global odd_usage_fields
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    if type(value) is float and math.isfinite(value) and value.is_integer() and 0 <= value <= MAX_TOKEN_COUNT:
        return int(value)
    if value is not _MISSING:
        odd_usage_fields += 1
    return 0


_MISSING: Any = object()


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Usage:
        """Read the OpenAI `usage` object of a response body (chat, completion, embedding, score, rerank or
        responses, which names its counts `input_tokens`/`output_tokens`). Never raises: a count that is not a
        non-negative whole number (NaN, a string, a negative, null) is 0 for this result, and counted in
        `odd_usage_fields`; what a backend puts there must not fail a batch."""
        usage = body.get("usage", _MISSING) if isinstance(body, dict) else _MISSING
        if not isinstance(usage, dict):
            if usage is not _MISSING and usage is not None:
                _count(usage)  # counted as odd
            return cls()
        responses = "input_tokens" in usage  # the Responses API's names
        details = usage.get("input_tokens_details" if responses else "prompt_tokens_details")
        cached = _count(details.get("cached_tokens", _MISSING)) if isinstance(details, dict) else 0
        return cls(
            input_tokens=_count(usage.get("input_tokens" if responses else "prompt_tokens", _MISSING)),
            cached_tokens=cached,
            output_tokens=_count(usage.get("output_tokens" if responses else "completion_tokens", _MISSING)),
        )


# Where each endpoint's successful answer keeps its results: a 200 without it (a list there) is no answer.
_ANSWER_FIELD = {CHAT: "choices", COMPLETIONS: "choices", EMBEDDINGS: "data", SCORE: "data", RERANK: "results",
                 RESPONSES: "output"}


def is_answer(url: str, body: Any) -> bool:
    """Whether `body` (parsed JSON) has the shape of a successful answer of endpoint `url`: an object with the
    endpoint's list of results (`choices` for chat and completions, `data` for embeddings and score, `results`
    for rerank, `output` for responses) and no error object. Cheap: a key or two, nothing serialized again. An
    endpoint this does not know is not checked."""
    if not isinstance(body, dict):
        return False
    key = _ANSWER_FIELD.get(url)
    if key is None:
        return True
    return isinstance(body.get(key), list) and not isinstance(body.get("error"), dict)


@dataclass
class Result:
    """What an OpenAI-compatible server would answer for one request.

    `status_code` 200 means success: the line goes to the output file. Anything else goes to the error file,
    with `body` being an OpenAI error object `{"error": {...}}`.
    """

    status_code: int
    body: dict[str, Any]
    usage: Usage = field(default_factory=Usage)
    # `body` exactly as the engine already serialized it (compact JSON on one line), when it did: written out
    # as it is rather than serialized again. An embedding's answer is mostly floats, and turning them back into
    # text took 0.19 ms for 384 of them (1.5x what parsing them takes), growing with the dimension.
    raw: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    @classmethod
    def error(cls, status_code: int, message: str, *, type: str = "invalid_request_error",
              param: str | None = None, code: str | None = None) -> Result:
        return cls(status_code, {"error": {"message": message, "type": type, "param": param, "code": code}})


class EngineError(RuntimeError):
    """The engine itself failed (died, hung, could not load): not the request's fault.

    The scheduler restarts the engine and resumes the batch from its last checkpoint; after a bounded number
    of attempts it fails the batch, keeping the results already committed.
    """


@runtime_checkable
class Engine(Protocol):
    """One model loaded at a time; many requests in flight."""

    @property
    def capacity(self) -> int:
        """How many requests in flight keep the engine fully busy (the runner's window)."""
        ...

    @property
    def model(self) -> str | None:
        """The model currently loaded, or None."""
        ...

    async def start(self, model: str) -> None:
        """Load `model` (a name from the server's configured models). Raises EngineError on failure."""
        ...

    async def stop(self) -> None:
        """Release the model and everything it holds. Safe to call when nothing is loaded."""
        ...

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        """Compute one request. Request-level problems come back as a non-200 Result, never as an exception;
        an exception means the engine is broken (EngineError) or the request was aborted (CancelledError).

        `priority` orders requests competing for the engine: lower runs first, ties by arrival (vLLM's
        convention). Online requests come with 0, batch requests with a larger value derived from their
        batch's completion window (see priority.py). An engine without a queue of its own may ignore it."""
        ...

    async def abort(self, request_ids: list[str]) -> None:
        """Stop computing these requests; their `run` calls end with CancelledError."""
        ...

    async def check_health(self) -> None:
        """Return if the loaded engine can serve; raise EngineError if it cannot. May never return when the
        engine is wedged: the caller bounds it with a timeout."""
        ...


@runtime_checkable
class StreamingEngine(Protocol):
    """Optional: an engine that can answer online requests with `"stream": true` (STREAMING_ENDPOINTS).

    A router forwards `stream` to the engine it picks; an engine without it answers streaming requests
    through the API with a 400.
    """

    async def stream(self, request_id: str, url: str, body: dict[str, Any], *,
                     priority: int = 0) -> Result | AsyncIterator[bytes]:
        """Start one streaming request. A request that fails before its first event comes back as a non-200
        Result (answered as JSON, as `vllm serve` does); otherwise an iterator of server-sent-event bytes,
        exactly as `vllm serve` writes them (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n` for chat and
        completions; `event: <type>\\ndata: {...}\\n\\n` for responses). Closing the iterator (`aclose`)
        before its end aborts the request. Raises EngineError when the engine is broken."""
        ...


@runtime_checkable
class SleepingEngine(Protocol):
    """Optional: an engine that can park its model and take it back without loading it again (vLLM's sleep
    mode, on GPUs). With `--max-sleeping-models`, the engine owner puts an evicted model's engine to sleep
    instead of stopping it, and wakes it when a batch needs that model again. Only idle engines are put to
    sleep: nothing is in flight."""

    async def sleep(self) -> None:
        """Release the model's memory for other engines, keeping what is needed to take it back (vLLM: level 1,
        the weights to CPU memory, the KV cache dropped). Raises EngineError if it cannot."""
        ...

    async def wake_up(self) -> None:
        """Take the model back, ready to serve again. Raises EngineError if it cannot."""
        ...
