"""The echo engine: deterministic OpenAI-shaped answers, no model. Opt-in only (`--engine echo`).

For users it is a dry run of their whole pipeline (files, ids, parsing) at no cost; for us it drives the
scheduler and runner at full speed. Answers depend only on the request, so a re-run after a crash produces the
same bytes, which is what lets crash tests compare outputs exactly.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

from vllm_batch_server.engines.base import CHAT, COMPLETIONS, EMBEDDINGS, EngineError, Result, Usage
from vllm_batch_server.settings import Settings

EMBED_DIM = 384


def _tokens(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _embedding(text: str) -> list[float]:
    """A unit-norm vector derived from the text's hash."""
    seed = hashlib.sha256(text.encode()).digest()
    values: list[float] = []
    counter = 0
    while len(values) < EMBED_DIM:
        block = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        values.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    values = values[:EMBED_DIM]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


@dataclass
class FaultPlan:
    """Opt-in fault injection (`--echo-fault`), so reliability tests can break the engine on purpose.

    `crash-after=N`: after N requests since the engine (re)started, every request raises EngineError, as a
    dead engine process would, until the scheduler restarts the engine. `hang-after=N`: instead, requests
    never return, as a wedged engine's would, until aborted. `exhaust-after=N`: instead, requests fail as an
    engine does when the server process has run out of file descriptors. `times=K` limits how many faults are injected
    over the process's life (default: one per engine start, forever). `journal=PATH` appends the id of every
    request the engine computed, so a soak test can count work done twice.
    """

    crash_after: int | None = None
    hang_after: int | None = None
    exhaust_after: int | None = None
    times: int | None = None
    journal: str | None = None

    @classmethod
    def parse(cls, spec: str | None) -> FaultPlan:
        plan = cls()
        for item in (spec or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise ValueError(f"--echo-fault: expected KEY=VALUE, got {item!r}")
            if key == "crash-after":
                plan.crash_after = int(value)
            elif key == "hang-after":
                plan.hang_after = int(value)
            elif key == "exhaust-after":
                plan.exhaust_after = int(value)
            elif key == "times":
                plan.times = int(value)
            elif key == "journal":
                plan.journal = value
            else:
                raise ValueError(f"--echo-fault: unknown key {key!r}; expected crash-after, hang-after, "
                                 "exhaust-after, times or journal")
        return plan


class EchoEngine:
    def __init__(self, settings: Settings) -> None:
        self._delay = settings.echo_delay
        # As vLLM's: twice the sequences it would batch, when that is set (the router's replicas use this).
        self._capacity = settings.window or (2 * settings.max_num_seqs if settings.max_num_seqs else 256)
        self._model: str | None = None
        self._served = set(settings.models)
        self._fault = FaultPlan.parse(settings.echo_fault)
        self._started_requests = 0  # since the last start(): what crash-after / hang-after count
        self._faults_injected = 0
        self._broken: str | None = None  # "crash" or "hang" once a fault fired, until the next start()
        # O_APPEND writes of one short line are atomic and reach the kernel at once, so a kill -9 loses none.
        self._journal = (os.open(self._fault.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                         if self._fault.journal else None)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def model(self) -> str | None:
        return self._model

    async def start(self, model: str) -> None:
        self._model = model
        self._started_requests = 0
        self._broken = None

    async def stop(self) -> None:
        self._model = None

    async def abort(self, request_ids: list[str]) -> None:
        # Nothing to release: the runner cancels the tasks awaiting `run`, which ends their sleep.
        return None

    async def check_health(self) -> None:
        if self._model is None:
            raise EngineError("no model is loaded")
        if self._broken in ("crash", "exhaust"):
            raise EngineError(f"echo engine broken (fault injected: {self._broken})")
        if self._broken == "hang":
            await asyncio.Event().wait()  # as a wedged engine would: the caller's timeout ends this

    def _inject_fault(self) -> None:
        """Count a started request and, past a configured point, break the engine until it restarts."""
        self._started_requests += 1
        plan = self._fault
        if self._broken is None and (plan.times is None or self._faults_injected < plan.times):
            if plan.crash_after is not None and self._started_requests > plan.crash_after:
                self._broken = "crash"
            elif plan.hang_after is not None and self._started_requests > plan.hang_after:
                self._broken = "hang"
            elif plan.exhaust_after is not None and self._started_requests > plan.exhaust_after:
                self._broken = "exhaust"
            if self._broken is not None:
                self._faults_injected += 1

    async def run(self, request_id: str, url: str, body: dict[str, Any]) -> Result:
        self._inject_fault()
        if self._broken == "crash":
            raise EngineError(f"echo engine crashed (fault injected after {self._fault.crash_after} "
                              "requests)")
        if self._broken == "hang":
            await asyncio.Event().wait()  # never set: only an abort (task cancellation) ends this
        if self._broken == "exhaust":
            raise EngineError("echo engine could not serve: [Errno 24] Too many open files (fault injected after "
                              f"{self._fault.exhaust_after} requests)")
        if self._delay > 0:
            await asyncio.sleep(self._delay)
        result = self._compute(request_id, url, body)
        if self._journal is not None:
            os.write(self._journal, f"{request_id}\n".encode())
        return result

    def _compute(self, request_id: str, url: str, body: dict[str, Any]) -> Result:
        model = body.get("model")
        if model != self._model:
            return Result.error(400, f"The model {model!r} is not loaded.", param="model",
                                code="model_not_found")
        if url == CHAT:
            return self._chat(request_id, body)
        if url == COMPLETIONS:
            return self._completion(request_id, body)
        if url == EMBEDDINGS:
            return self._embeddings(body)
        return Result.error(404, f"Unsupported endpoint {url!r}.", code="unknown_url")

    @staticmethod
    def _max_tokens(body: dict[str, Any]) -> int | None:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        return value if isinstance(value, int) and value >= 0 else None

    def _answer(self, prompt: str, body: dict[str, Any]) -> tuple[str, str, Usage]:
        words = prompt.split()
        limit = self._max_tokens(body)
        finish = "stop"
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "length"
        text = " ".join(words)
        return text, finish, Usage(input_tokens=_tokens(prompt), output_tokens=len(words))

    @staticmethod
    def _usage(usage: Usage) -> dict[str, Any]:
        return {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        }

    def _chat(self, request_id: str, body: dict[str, Any]) -> Result:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return Result.error(400, "'messages' must be a non-empty list.", param="messages")
        last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                         messages[-1])
        prompt = _text_of(last_user.get("content") if isinstance(last_user, dict) else "")
        text, finish, usage = self._answer(prompt, body)
        n = body.get("n", 1)
        if not isinstance(n, int) or n < 1:
            n = 1
        return Result(200, {
            "id": "chatcmpl-" + request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish}
                for i in range(n)
            ],
            "usage": self._usage(usage),
        }, usage)

    def _completion(self, request_id: str, body: dict[str, Any]) -> Result:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return Result.error(400, "'prompt' must be a string.", param="prompt")
        text, finish, usage = self._answer(prompt, body)
        return Result(200, {
            "id": "cmpl-" + request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": self._usage(usage),
        }, usage)

    def _embeddings(self, body: dict[str, Any]) -> Result:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            return Result.error(400, "'input' must be a string or a non-empty list of strings.",
                                param="input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return Result.error(400, "'encoding_format' must be 'float' or 'base64'.",
                                param="encoding_format")
        data = []
        for index, text in enumerate(inputs):
            vector = _embedding(text)
            embedding: Any = vector
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = Usage(input_tokens=sum(_tokens(t) for t in inputs))
        return Result(200, {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens},
        }, usage)
