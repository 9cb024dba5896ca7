"""The echo engine: deterministic OpenAI-shaped answers, no model. Opt-in only (`--engine echo`).

For users it is a dry run of their whole pipeline (files, ids, parsing) at no cost; for us it drives the
scheduler and runner at full speed. Answers depend only on the request, so a re-run after a crash produces the
same bytes, which is what lets crash tests compare outputs exactly.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import heapq
import itertools
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vllm_batch_server.engines import echo_stream
from vllm_batch_server.engines.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RERANK,
    RESPONSES,
    SCORE,
    STREAMING_ENDPOINTS,
    EngineError,
    Result,
    Usage,
)
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


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # both are unit vectors


class PriorityGate:
    """At most `slots` requests compute at once; the others wait, lowest priority value first, then in
    arrival order — the rule vLLM's priority scheduler applies, so the echo engine orders work as vLLM does
    and tests of who-goes-first run at echo speed. `slots=None`: no limit (everything computes at once)."""

    def __init__(self, slots: int | None) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        if self._free is None:
            yield
            return
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._arrivals), turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot was handed over just as the waiter was cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():  # a waiter cancelled meanwhile is skipped
                turn.set_result(None)
                return
        assert self._free is not None
        self._free += 1


class _Sequence:
    def __init__(self, tokens: int, done: asyncio.Future[None]) -> None:
        self.tokens = tokens
        self.done = done


class StepClock:
    """Continuous batching as vLLM runs it, in time only: the requests computing take engine steps together,
    each advancing one token per step, and a step costs `base + per_request × requests in it`. With
    `per_request` > 0 a step's cost grows with the batch, as on a CPU (on a GPU it barely does): what makes an
    online request beside a full batch slower than alone, at echo speed (the online controller's tests)."""

    def __init__(self, base: float, per_request: float) -> None:
        self._base = base
        self._per_request = per_request
        self._running: dict[_Sequence, None] = {}  # in arrival order
        self._stepping: asyncio.Task[None] | None = None

    async def generate(self, tokens: int) -> None:
        sequence = _Sequence(max(1, tokens), asyncio.get_running_loop().create_future())
        self._running[sequence] = None
        if self._stepping is None or self._stepping.done():
            self._stepping = asyncio.create_task(self._steps())
        try:
            await sequence.done
        finally:
            self._running.pop(sequence, None)  # cancelled (aborted): it leaves the next step

    async def _steps(self) -> None:
        while self._running:
            in_step = list(self._running)  # who joins during a step starts at the next one, as in vLLM
            await asyncio.sleep(self._base + self._per_request * len(in_step))
            for sequence in in_step:
                sequence.tokens -= 1
                if sequence.tokens <= 0 and sequence in self._running:
                    del self._running[sequence]
                    if not sequence.done.done():
                        sequence.done.set_result(None)


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
        self._steps = (StepClock(settings.echo_step_seconds, settings.echo_step_seconds_per_request)
                       if settings.echo_step_seconds > 0 or settings.echo_step_seconds_per_request > 0 else None)
        # As vLLM's: twice the sequences it would batch, when that is set (the router's replicas use this).
        self._capacity = settings.window or (2 * settings.max_num_seqs if settings.max_num_seqs else 256)
        # --max-num-seqs caps how many requests compute at once, as it does for vLLM; the rest wait in
        # priority order. Unset: no cap.
        self._gate = PriorityGate(settings.max_num_seqs)
        self._priorities = settings.priority_scheduling  # off: first come, first served, as vLLM's fcfs
        self._model: str | None = None
        self._served = set(settings.models)
        self._fault = FaultPlan.parse(settings.echo_fault)
        self._started_requests = 0  # since the last start(): what crash-after / hang-after count
        self._faults_injected = 0
        self._broken: str | None = None  # "crash" or "hang" once a fault fired, until the next start()
        self.asleep = False  # as vLLM's sleep mode leaves an engine: its model kept, serving nothing
        # What the engine was asked, in order ("start m", "stop", "sleep", "wake_up"): tests read it to see
        # the engine owner's order of operations, which the GPU-only sleep mode cannot show on these machines.
        self.calls: collections.deque[str] = collections.deque(maxlen=256)
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
        self.calls.append(f"start {model}")
        self._model = model
        self._started_requests = 0
        self._broken = None
        self.asleep = False

    async def stop(self) -> None:
        self.calls.append("stop")
        self._model = None
        self.asleep = False

    async def sleep(self) -> None:
        self.calls.append("sleep")
        if self._model is None:
            raise EngineError("no model is loaded")
        self.asleep = True

    async def wake_up(self) -> None:
        self.calls.append("wake_up")
        if self._model is None:
            raise EngineError("no model is loaded")
        self.asleep = False

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

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        if self.asleep:
            raise EngineError("echo engine asleep: a request reached an engine put to sleep")
        self._inject_fault()
        if self._broken == "crash":
            raise EngineError(f"echo engine crashed (fault injected after {self._fault.crash_after} "
                              "requests)")
        if self._broken == "hang":
            await asyncio.Event().wait()  # never set: only an abort (task cancellation) ends this
        if self._broken == "exhaust":
            raise EngineError("echo engine could not serve: [Errno 24] Too many open files (fault injected after "
                              f"{self._fault.exhaust_after} requests)")
        if body.get("stream") is True:
            return Result.error(400, "stream is not supported here; results are returned whole",
                                param="stream")
        try:
            async with self._gate.slot(priority if self._priorities else 0):
                if self._delay > 0:
                    await asyncio.sleep(self._delay)
                result = self._compute(request_id, url, body)
                if self._steps is not None:  # one step per output token (one for an embedding or a score)
                    await self._steps.generate(result.usage.output_tokens)
        except asyncio.CancelledError:
            # As vLLM's serving layer does: a request cancelled while it waits or computes is answered with
            # 400 "Client disconnected" rather than raising, so the fast suite meets what the real engine does
            # when we abort a request (that answer must never be taken for the request's result).
            return Result(400, {"error": {"message": "Client disconnected", "type": "BadRequestError",
                                          "param": None, "code": 400}})
        if self._journal is not None:
            os.write(self._journal, f"{request_id}\n".encode())
        return result

    async def stream(self, request_id: str, url: str, body: dict[str, Any], *,
                     priority: int = 0) -> Result | AsyncIterator[bytes]:
        """The same answer as `run`, cut into the server-sent events `vllm serve` would send."""
        if url not in STREAMING_ENDPOINTS:
            return Result.error(400, f"{url} does not stream", param="stream")
        whole = await self.run(request_id, url, {k: v for k, v in body.items()
                                                 if k not in ("stream", "stream_options")}, priority=priority)
        if not whole.ok:
            return whole
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return echo_stream.events(url, whole.body, include_usage=include_usage)

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
        if url == RESPONSES:
            return self._responses(request_id, body)
        if url == SCORE:
            return self._score(request_id, body)
        if url == RERANK:
            return self._rerank(request_id, body)
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
                # weight_versions: as vLLM 0.33+ answers (null unless `return_weight_versions`).
                {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish, "weight_versions": None}
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
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                         "weight_versions": None}],
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

    def _responses(self, request_id: str, body: dict[str, Any]) -> Result:
        raw = body.get("input")
        if isinstance(raw, str):
            prompt = raw
        elif isinstance(raw, list) and raw:
            users = [item for item in raw if isinstance(item, dict) and item.get("role", "user") == "user"]
            prompt = _text_of((users or raw)[-1].get("content")) if isinstance((users or raw)[-1], dict) else ""
        else:
            return Result.error(400, "'input' must be a string or a non-empty list of input items.",
                                param="input")
        limit = body.get("max_output_tokens")
        text, finish, usage = self._answer(prompt, {"max_tokens": limit})
        # Cut off by max_output_tokens: the response and its message are "incomplete", as in vLLM 0.33+.
        status = "completed" if finish == "stop" else "incomplete"
        return Result(200, {
            "id": "resp_" + request_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": status,
            "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
            "error": None,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "max_output_tokens": limit,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "output": [{
                "type": "message", "id": "msg_" + request_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}],
            }],
            "usage": {
                "input_tokens": usage.input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": usage.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.input_tokens + usage.output_tokens,
            },
        }, usage)

    @staticmethod
    def _texts(value: Any, param: str) -> list[str] | Result:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            return Result.error(400, f"'{param}' must be a string or a non-empty list of strings.", param=param)
        return items

    def _score(self, request_id: str, body: dict[str, Any]) -> Result:
        """As vLLM pairs them: one query against every document, or the i-th query with the i-th document."""
        for first, second in (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"),
                              ("data_1", "data_2")):
            if first in body or second in body:
                break
        left, right = self._texts(body.get(first), first), self._texts(body.get(second), second)
        if isinstance(left, Result):
            return left
        if isinstance(right, Result):
            return right
        if len(left) == 1:
            left = left * len(right)
        if len(left) != len(right):
            return Result.error(400, f"'{first}' and '{second}' must have the same length, or '{first}' one "
                                "item.", param=first)
        scores = [_cosine(_embedding(a), _embedding(b)) for a, b in zip(left, right, strict=True)]
        tokens = sum(_tokens(a) + _tokens(b) for a, b in zip(left, right, strict=True))
        return Result(200, {
            "id": "score-" + request_id, "object": "list", "created": int(time.time()), "model": body["model"],
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        }, Usage(input_tokens=tokens))

    def _rerank(self, request_id: str, body: dict[str, Any]) -> Result:
        query = body.get("query")
        if not isinstance(query, str):
            return Result.error(400, "'query' must be a string.", param="query")
        documents = self._texts(body.get("documents"), "documents")
        if isinstance(documents, Result):
            return documents
        top_n = body.get("top_n") or len(documents)
        if not isinstance(top_n, int) or top_n < 0:
            return Result.error(400, "'top_n' must be a non-negative integer.", param="top_n")
        wanted = _embedding(query)
        scores = [_cosine(wanted, _embedding(d)) for d in documents]
        order = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
        results = [{"index": i, "document": {"text": documents[i], "multi_modal": None},
                    "relevance_score": scores[i]} for i in order]
        tokens = sum(_tokens(query) + _tokens(d) for d in documents)
        return Result(200, {
            "id": "score-" + request_id, "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results,
        }, Usage(input_tokens=tokens))
