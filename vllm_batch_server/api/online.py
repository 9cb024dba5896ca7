"""Online requests: POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/score and
/v1/rerank, answered right away by the engine the batches use.

The body of an answer is the engine's (for vLLM, what `vllm serve` answers: its own serving classes compute it),
streamed as server-sent events when the request asks for `"stream": true`. What this module adds is the
sharing rule:

- only the loaded model answers, and a request never makes the engine switch under a batch: the scheduler
  decides which model is loaded. A request for another served model gets 503 with Retry-After while the
  server is on its way to serving it; without `--online-model` it always is (the model is loaded for online
  requests once no batch runs or waits, as a batch of it would be); with `--online-model`, which keeps that
  one loaded, a request for another gets a 400 naming the loaded one;
- online requests run ahead of batch work (priority 0, see priority.py);
- at most `--online-max-requests` are admitted at once; the next one gets 429 with Retry-After at once,
  rather than a wait without end;
- a caller who goes away has its request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vllm_batch_server.api.context import Context, context
from vllm_batch_server.api.errors import APIError
from vllm_batch_server.api.params import json_object
from vllm_batch_server.engines.base import (
    STREAMING_ENDPOINTS,
    SUPPORTED_ENDPOINTS,
    EngineError,
    Result,
    StreamingEngine,
)
from vllm_batch_server.queue.engine_owner import EngineState, Slot
from vllm_batch_server.queue.online import Admission
from vllm_batch_server.queue.priority import online_priority
from vllm_batch_server.statuses import BatchStatus

log = logging.getLogger(__name__)

# What a caller refused for a full queue is told to wait: online requests are short, a slot frees soon.
RETRY_AFTER_FULL = 1
# ... and while the engine loads a model or restarts (tens of seconds for vLLM).
RETRY_AFTER_LOADING = 10


class _Call:
    """One online request's bookkeeping: admission slot, metrics, released exactly once."""

    def __init__(self, ctx: Context, url: str, model: Any) -> None:
        self.scheduler = ctx.scheduler
        self.traffic = ctx.scheduler.online
        self.url = url
        self.model = model
        self.started = time.monotonic()
        self.slot: Slot | None = None  # the engine answering it: not stopped until it is answered
        self.admission: Admission | None = None
        # Output tokens of a successful answer (the usage of a whole one; a stream's events, about one a token):
        # the latency controller's time per token (queue/online_control.py).
        self.tokens: int | None = None
        self._early_acted = False
        self._done = False

    @property
    def admitted(self) -> bool:
        return self.admission is not None

    def admit(self) -> None:
        self.admission = self.traffic.try_admit()
        if self.admission is None:
            raise APIError(429, f"The server is answering its limit of {self.traffic.limit} online requests "
                           f"at once; retry in {RETRY_AFTER_FULL}s.", code="rate_limit_exceeded",
                           headers={"retry-after": str(RETRY_AFTER_FULL)})
        self.slot = self.scheduler.engine_owner.online_began(self.model)

    def first_token(self) -> None:
        self.traffic.metrics.first_token(self.model, self.url, time.monotonic() - self.started)

    def progress(self, tokens: int) -> None:
        """A stream's tokens so far, told to the latency controller until it has acted on them once."""
        if self.admission is not None and not self._early_acted and isinstance(self.model, str):
            self._early_acted = self.traffic.progress(self.admission, self.model, self.url, tokens)

    def finish(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        if self.admission is not None:
            measured = status == 200 and self.tokens is not None and isinstance(self.model, str)
            self.traffic.release(self.admission, model=self.model if measured else None, endpoint=self.url,
                                 tokens=self.tokens)
        if self.slot is not None:
            self.scheduler.engine_owner.online_ended(self.slot)
        self.traffic.metrics.answered(self.model, self.url, status, time.monotonic() - self.started)


async def create(request: Request) -> Response:
    ctx = context(request)
    url = request.url.path
    body = await json_object(request, ctx.settings.online_max_body_bytes)
    call = _Call(ctx, url, body.get("model"))
    try:
        response = await _serve(ctx, request, call, url, body)
    except APIError as exc:
        call.finish(exc.status)
        raise
    except BaseException:
        call.finish(500)
        raise
    if not isinstance(response, _EventStream):
        call.finish(response.status_code)  # a stream finishes when its last event is sent
    return response


async def _serve(ctx: Context, request: Request, call: _Call, url: str, body: dict[str, Any]) -> Response:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "Missing required parameter: 'model'.", param="model",
                       code="missing_required_parameter")
    served = ctx.settings.models
    if model not in served:
        raise APIError(404, f"The model '{model[:200]}' does not exist or is not served here (served: "
                       f"{', '.join(served)}).", param="model", code="model_not_found")
    ctx.scheduler.online.arrived(model)
    slot = await _check_loaded(ctx, model)
    try:
        priority = online_priority(body.pop("priority", None))
    except ValueError as exc:
        raise APIError(400, str(exc), param="priority", code="invalid_value") from None
    streaming = body.get("stream") is True
    engine = slot.engine
    if streaming and (url not in STREAMING_ENDPOINTS or not isinstance(engine, StreamingEngine)):
        raise APIError(400, f"'stream' is not supported for {url}" + (
            "" if url not in STREAMING_ENDPOINTS else f" by the {ctx.settings.engine} engine") + ".",
            param="stream", code="unsupported_parameter")

    call.admit()
    # vLLM's own form of request id, so response ids look as `vllm serve` makes them (`chatcmpl-<hex>`).
    request_id = uuid.uuid4().hex
    try:
        if streaming:
            assert isinstance(engine, StreamingEngine)
            outcome = await _unless_disconnected(request, engine.stream(request_id, url, body,
                                                                        priority=priority))
            if not isinstance(outcome, Result):
                return _EventStream(outcome, call)
            result = outcome
        else:
            result = await _unless_disconnected(request, engine.run(request_id, url, body, priority=priority))
    except EngineError as exc:
        ctx.scheduler.online_engine_failed(exc, model)
        raise APIError(503, "The engine failed while computing this request and is being restarted; retry in "
                       "a moment.", type="server_error", code="engine_unavailable",
                       headers={"retry-after": str(RETRY_AFTER_LOADING)}) from None
    call.tokens = result.usage.output_tokens
    if result.raw is not None:  # already JSON, as the engine wrote it
        return Response(result.raw, status_code=result.status_code, media_type="application/json")
    return JSONResponse(result.body, status_code=result.status_code)


async def _check_loaded(ctx: Context, model: str) -> Slot:
    """Only a loaded model answers online requests: the engine serving it. Any other served model gets 503
    with Retry-After while the server is on its way to serving it (loading it, restarting the engine that had
    it, keeping it for online traffic, or with a batch of it queued), and 400 naming what is loaded when it
    will not serve it."""
    owner = ctx.scheduler.engine_owner
    serving = owner.serving(model)
    if serving is not None:
        return serving
    held = owner.holding(model)
    state, loaded, loading = owner.state, ctx.scheduler.engine.model, owner.loading_model
    retry = {"retry-after": str(RETRY_AFTER_LOADING)}
    if held is not None and held.state is EngineState.LOADING:
        raise APIError(503, f"The model '{model}' is being loaded; retry in a moment.", type="server_error",
                       param="model", code="model_loading", headers=retry)
    if held is not None and held.state is EngineState.FAILED:
        raise APIError(503, f"The engine serving '{model}' failed and is being restarted; retry in a moment.",
                       type="server_error", code="engine_unavailable", headers=retry)
    if model == ctx.settings.online_model:
        # Kept for online traffic: it is about to be loaded (at start, after a failure), or loaded again once
        # the batches of another model that ran while online traffic was quiet have ended.
        other = loading or loaded
        if other is None or other == model:
            message = f"The model '{model}' is being loaded; retry in a moment."
        else:
            message = (f"The model '{model}' is not loaded right now: the engine runs batches of '{other}', "
                       f"started after online traffic was quiet for {ctx.settings.online_idle_seconds:g}s; "
                       f"'{model}' is loaded again when they end.")
        raise APIError(503, message, type="server_error", param="model", code="model_not_loaded", headers=retry)
    if state is EngineState.LOADING and loaded is not None and loaded != loading:
        now = f"the engine is switching from '{loaded}' to '{loading}' for a batch"
    elif state is EngineState.LOADING:
        now = f"the engine is loading '{loading}' for a batch"
    elif state is EngineState.FAILED and loaded is not None:
        now = f"the engine had '{loaded}' and is being restarted"
    elif state is EngineState.READY and loaded is not None:
        now = f"the loaded model is '{loaded}'"
    else:
        now = "no model is loaded"
    if owner.max_loaded > 1:
        ready = [slot.engine.model for slot in owner.slots if slot.state is EngineState.READY]
        now = (f"the loaded models are {', '.join(repr(m) for m in ready)}" if ready else "no model is loaded") + (
            f", and '{loading}' is loading" if loading else "")
    if ctx.settings.online_model is None and await _batch_queued_for(ctx, model):
        # The scheduler loads it for that batch. (With --online-model, batches of other models wait for online
        # traffic to be quiet, which this request is not: they do not count.)
        raise APIError(503, f"The model '{model}' is not loaded right now: {now}. A queued batch of '{model}' "
                       "loads it when its turn comes; retry then.", type="server_error", param="model",
                       code="model_not_loaded", headers=retry)
    if ctx.settings.online_model is None:
        # A model it lists is a model it serves: loaded for online requests as a batch of it would be, once the
        # batches running or queued are done (so another vllm-batch server can route to this one with no flags).
        ctx.scheduler.want_online(model)
        raise APIError(503, f"The model '{model}' is not loaded right now: {now}. It is loaded for online "
                       "requests once the batches running or queued are done; retry then.", type="server_error",
                       param="model", code="model_not_loaded", headers=retry)
    raise APIError(400, f"The model '{model}' is not loaded: {now}. Online requests are answered by the loaded "
                   "model only and never switch it (batches decide which model is loaded; start the server "
                   f"with --online-model {model} to keep it loaded).", param="model", code="model_not_loaded")


async def _batch_queued_for(ctx: Context, model: str) -> bool:
    """Whether a validated batch of `model` is queued (not ending): the scheduler loads `model` for it."""
    queued = await ctx.db.batches_in([BatchStatus.IN_PROGRESS])
    return any(batch.model == model and not batch.outcome for batch in queued)


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, aborting it (in the engine too) if the caller disconnects first, as `vllm serve` does."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        # Starlette has no one left to answer; the status only reaches the metrics (499: client closed).
        raise APIError(499, "The client closed the connection before the answer was ready.")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """The engine's server-sent events to the caller. However the response ends (the last event, the caller
    gone, the engine failing, or never started at all), the engine's stream is closed — which aborts the
    request there — and the admission slot is released."""

    def __init__(self, events: AsyncIterator[bytes], call: _Call) -> None:
        super().__init__(self._relay(events, call), media_type="text/event-stream")
        self._events = events
        self._call = call

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._call.finish(499)  # unless finished already: it ended before its last event
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    async def _relay(events: AsyncIterator[bytes], call: _Call) -> AsyncIterator[bytes]:
        first = True
        count = 0
        try:
            async for chunk in events:
                if first:
                    call.first_token()
                    first = False
                count += 1
                if count >= 5 and (count - 1) & (count - 2) == 0:  # after 4, 8, 16, ... tokens (and the role's event)
                    call.progress(count - 1)
                yield chunk
        except EngineError as exc:
            # Too late for a status: end the stream with an error event, as `vllm serve` does (the SDK raises it).
            log.error("the engine failed during a streamed online request: %s", exc)
            call.scheduler.online_engine_failed(exc, call.model)
            call.finish(503)
            error = {"error": {"message": "The engine failed while streaming this answer and is being "
                               "restarted; retry in a moment.", "type": "server_error", "param": None,
                               "code": 503}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
            return
        call.tokens = max(1, count - 2)  # less the role's first event and the last ([DONE], or completed)
        call.finish(200)


routes = [Route(path, create, methods=["POST"]) for path in SUPPORTED_ENDPOINTS]
