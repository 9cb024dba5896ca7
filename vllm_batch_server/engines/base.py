"""The contract between the scheduler and whatever computes a request.

The scheduler and runner know nothing of vLLM: they hand an engine one OpenAI request body at a time and get
back the HTTP status and body that an OpenAI-compatible server would have answered. That keeps the durable
part of the system testable at full speed with the echo engine, and keeps vLLM's version drift in one module.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Usage:
        """Read the OpenAI `usage` object of a response body (chat, completion, embedding, score, rerank or
        responses, which names its counts `input_tokens`/`output_tokens`)."""
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return cls()
        if "input_tokens" in usage:  # the Responses API's names
            details = usage.get("input_tokens_details") or {}
            return cls(
                input_tokens=int(usage.get("input_tokens") or 0),
                cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
                output_tokens=int(usage.get("output_tokens") or 0),
            )
        details = usage.get("prompt_tokens_details") or {}
        return cls(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
            output_tokens=int(usage.get("completion_tokens") or 0),
        )


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
