"""Many engines behind the one Engine the scheduler and runner see.

The router spreads a batch's requests over its members — the in-process engine, OpenAI-compatible backends
(http.py), Ray replicas (ray.py) — and keeps the runner's exactly-once contract untouched: `run` returns one
answer per request, and only answers the runner commits count, whatever happened on the way.

- **Windows and prefix affinity** (dispatch.py). Each member has a window (window.py): at most that many
  requests in flight on it. The router asks the runner for a quarter more requests than all windows hold
  (`capacity`), so when a slot frees there is a choice of which waiting request takes it: one whose prompt
  prefix the member holds in its cache (affinity.py) first.
- **Failover.** A member that dies, hangs (its health checks fail) or refuses us is taken out of rotation, and
  the requests in flight on it go back to the head of the queue for the others. It comes back once its health
  check passes (an HTTP backend serves the model again; an engine or replica is restarted). A request that
  fails on a member for a reason that may be its own (a 500, a timeout) is tried on up to MAX_CHARGED members,
  then answered with the last error (its error line); a failure that is surely the member's (overload, a
  dead backend) never fails the request.
- **Only answers are successes.** A 200 whose body is no answer of the endpoint (http.py checks it; the router
  checks every member's) is the member's fault: charged, tried elsewhere, and counted against the member
  apart from its other failures (a score that decays with each good answer), so a member that keeps answering
  garbage is taken out like a dead one, for longer each time it comes back still doing so. When every attempt
  got garbage, the request's answer is a 502 `bad_backend_response` error line.
- **Engine failure** is only when nothing can serve: when no member is in rotation for
  `--backend-wait-seconds`, the waiting requests raise EngineError, which the scheduler treats as an engine
  failure of the batch (restart, resume from the checkpoint, bounded attempts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from vllm_batch_server.engines.base import Engine, EngineError, Result, is_answer
from vllm_batch_server.engines.http import BackendError, HttpEngine, ModelNotServed
from vllm_batch_server.engines.router.affinity import AffinityTable, prompt_chunks
from vllm_batch_server.engines.router.dispatch import Dispatcher, Member, MemberState
from vllm_batch_server.engines.router.window import Window
from vllm_batch_server.settings import Settings

log = logging.getLogger(__name__)

# Attempts of one request that may be its own fault (500, timeout, 404) before it gets that error as its answer.
MAX_CHARGED = 3
# Attempts that failed because of the member (moved off a dead one, overload) before the request is given up on
# as an engine failure: only reached when members keep failing, which is engine trouble, not the request's.
MAX_UNCHARGED = 12
# Consecutive failed attempts on a member before it is taken out of rotation.
FAILURES_TO_DOWN = 5
# Consecutive failed health checks before a member is taken out of rotation.
PROBES_TO_DOWN = 2
# Longest pause between attempts to bring a member back.
MAX_RECOVERY_BACKOFF = 60.0
# A member's garbage score (see `Member.garbage`) at which it is taken out, and how much of it each good
# answer keeps: one answering 20% or more garbage is taken out, one at a few percent is not.
GARBAGE_TO_DOWN = 5.0
GARBAGE_DECAY = 0.95


class Router:
    """The Engine protocol over several engines; see the module's docstring."""

    def __init__(self, members: list[tuple[str, str, Engine]], settings: Settings) -> None:
        if not members:
            raise ValueError("a router needs at least one engine")
        self.settings = settings
        self.members = [Member(index, engine, name, kind, Window(engine.capacity, adaptive=(kind == "http")))
                        for index, (name, kind, engine) in enumerate(members)]
        self._model: str | None = None
        self._affinity = AffinityTable() if settings.prefix_affinity else None
        self._slots = Dispatcher(self.members, self._affinity)
        self._active: set[str] = set()  # request ids inside run()
        self._aborted: set[str] = set()
        self._moving: set[asyncio.Task[Any]] = set()  # requests' tasks cancelled to move them off a member
        self._watch: asyncio.Task[None] | None = None
        self._none_up_since: float | None = time.monotonic()
        self._last_probe = 0.0

    # ------------------------------------------------------------------------------------------ protocol

    @property
    def capacity(self) -> int:
        total = sum(member.window.cap for member in self.members)
        # A few more than all windows hold, so a freed slot has a choice of requests (prefix affinity).
        return total + max(1, total // 4)

    @property
    def model(self) -> str | None:
        return self._model

    async def start(self, model: str) -> None:
        """Start `model` on every member that has it; return once one is in rotation (the others join as they
        come up). Raises EngineError when none can serve it."""
        if self._model == model and any(m.state is MemberState.UP for m in self.members):
            return
        await self.stop()
        self._model = model
        self._none_up_since = time.monotonic()
        for member in self.members:
            member.state = MemberState.STARTING
            member.recovery = asyncio.create_task(self._recover(member, first=True),
                                                  name=f"start {member.name}")
        deadline = time.monotonic() + self.settings.backend_wait_seconds
        while not any(m.state is MemberState.UP for m in self.members):
            starting = [m for m in self.members if m.state is MemberState.STARTING]
            unserved = all(isinstance(m.reason, str) and m.reason.startswith("not served") for m in self.members
                           if m.state is MemberState.DOWN)
            if not starting and unserved:
                break  # every member answered that it does not have the model: waiting will not change that
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if not any(m.state is MemberState.UP for m in self.members):
            summary = self._summary()
            await self.stop()
            raise EngineError(f"no engine can serve model {model!r}: {summary}")
        self._watch = asyncio.create_task(self._watch_loop(), name="router watch")

    async def stop(self) -> None:
        tasks = [t for t in (self._watch, *(m.recovery for m in self.members)) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watch = None
        self._slots.fail_waiting(EngineError("the engine was stopped"))
        for member in self.members:
            for request in list(member.inflight.values()):
                request.cancel()
            member.recovery = None
        await asyncio.gather(*(self._stop_member(m) for m in self.members), return_exceptions=True)
        for member in self.members:
            member.state, member.reason, member.busy = MemberState.IDLE, None, 0
        self._model = None

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        result = await self._route(request_id, url, body, priority, streaming=False)
        assert isinstance(result, Result)
        return result

    async def stream(self, request_id: str, url: str, body: dict[str, Any], *,
                     priority: int = 0) -> Result | AsyncIterator[bytes]:
        """An online request with `"stream": true`, on a member that can stream (see base.StreamingEngine). The
        member's window slot is held until the events end or the iterator is closed. Only a failure before the
        first event is tried on another member."""
        return await self._route(request_id, url, body, priority, streaming=True)

    async def _route(self, request_id: str, url: str, body: dict[str, Any], priority: int, *,
                     streaming: bool) -> Result | AsyncIterator[bytes]:
        if self._model is None:
            raise EngineError("no model is loaded")
        chunks = prompt_chunks(body) if self._affinity is not None else []
        seq = self._slots.next_seq()  # kept across attempts: a moved request goes before newer ones
        charged = uncharged = 0
        # Members that cannot stream are avoided for a stream (and refused if nothing else is in rotation).
        avoid = sum(m.bit for m in self.members if not hasattr(m.engine, "stream")) if streaming else 0
        self._active.add(request_id)
        try:
            while True:
                if request_id in self._aborted:
                    raise asyncio.CancelledError
                member = await self._slots.acquire(request_id, priority, seq, chunks, avoid)
                if request_id in self._aborted:  # aborted just as it got its slot
                    self._slots.release(member)
                    raise asyncio.CancelledError
                if streaming and not hasattr(member.engine, "stream"):
                    self._slots.release(member)
                    return Result.error(400, "Streaming is not supported by the engines serving this model now.",
                                        param="stream")
                generation, began = member.generation, time.monotonic()
                task = asyncio.ensure_future(self._call(member, request_id, url, body, priority, streaming))
                member.inflight[request_id] = task
                held = False
                try:
                    try:
                        await asyncio.wait({task})
                    except asyncio.CancelledError:
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            late = await task
                            if not isinstance(late, Result):  # a stream that began meanwhile: end it
                                await late.aclose()  # type: ignore[attr-defined]
                        raise
                    outcome = None if task.cancelled() or task.exception() else task.result()
                    held = outcome is not None and not isinstance(outcome, Result)
                finally:
                    member.inflight.pop(request_id, None)
                    if not held:
                        self._slots.release(member)
                moved = task in self._moving
                self._moving.discard(task)
                if request_id in self._aborted or moved:
                    # Whatever came back is the member's reply to our cancel (vLLM's: 400 "Client
                    # disconnected"), not the request's result: an abort ends it, a move tries it elsewhere.
                    if held:
                        with contextlib.suppress(BaseException):
                            await outcome.aclose()  # type: ignore[union-attr]
                        self._slots.release(member)
                    if request_id in self._aborted:
                        raise asyncio.CancelledError
                error: BaseException | None = None
                if task.cancelled() or moved:
                    outcome = None
                    uncharged += 1  # moved off a member taken out of rotation
                    member.moved += 1
                elif outcome is None:
                    error = task.exception()
                elif isinstance(outcome, Result) and outcome.ok and not is_answer(url, outcome.body):
                    outcome, error = None, BackendError(
                        f"{member.kind} {member.name}: answered 200 with no {url} answer", bad_answer=True,
                        result=Result.error(502, f"The engines tried answered {url} with something that is not an "
                                            "answer of it.", type="server_error", code="bad_backend_response"))
                if outcome is not None:
                    if isinstance(outcome, Result):
                        self._succeeded(member, time.monotonic() - began, outcome)
                        return outcome
                    self._succeeded(member, time.monotonic() - began, None)
                    return self._held(member, outcome)
                if error is not None:
                    if not isinstance(error, EngineError):
                        raise error  # ours, not the member's (a resource ran out, a bug)
                    self._failed(member, error, generation)
                    if isinstance(error, BackendError) and error.charge:
                        charged += 1
                        avoid |= member.bit  # maybe the member's fault: the next attempt goes elsewhere
                        if charged >= MAX_CHARGED:
                            log.warning("request %s failed on %d attempts; answering with the last error: %s",
                                        request_id, charged, error)
                            return error.result
                        log.warning("request %s: %s; trying another engine", request_id, error)
                    elif not (isinstance(error, BackendError) and error.busy):
                        uncharged += 1  # (waiting out a rate limit costs time, not attempts)
                if uncharged >= MAX_UNCHARGED:
                    raise EngineError(f"request {request_id} could not be served after {uncharged} attempts on "
                                      f"failing engines: {self._summary()}")
        finally:
            self._active.discard(request_id)
            self._aborted.discard(request_id)

    async def _held(self, member: Member, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A member's stream, holding its window slot until the stream ends or is closed."""
        try:
            async for piece in events:
                yield piece
        finally:
            try:
                await events.aclose()  # type: ignore[attr-defined]
            finally:
                self._slots.release(member)

    async def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if request_id not in self._active:
                continue
            self._aborted.add(request_id)
            self._slots.cancel(request_id)
            for member in self.members:
                task = member.inflight.get(request_id)
                if task is not None:
                    task.cancel()

    async def check_health(self) -> None:
        if not any(m.state is MemberState.UP for m in self.members):
            raise EngineError(f"no engine is in rotation: {self._summary()}")

    def not_ready(self) -> str | None:
        """Why the router cannot serve its loaded model now (/ready's reason), or None. Before a model is
        loaded, nothing: backends are asked when the first batch needs them, and a model switch is no fault."""
        if self._model is None or any(m.state is MemberState.UP for m in self.members):
            return None
        return f"no engine or backend is in rotation for model {self._model!r}: {self._summary()}"

    # ------------------------------------------------------------------------------------------ models

    async def served_models(self) -> list[str]:
        """The models a batch may name: the configured ones when an engine here or on Ray loads them, and what
        the backends' /v1/models list (refreshed when older than a health-check period)."""
        names: list[str] = []
        if any(m.kind != "http" for m in self.members):
            names.extend(self.settings.models)
        backends = [m.engine for m in self.members if isinstance(m.engine, HttpEngine)]
        now = time.monotonic()
        stale = [b for b in backends if now - b.models_checked_at > self.settings.backend_probe_seconds]
        if stale:
            await asyncio.gather(*(b.list_models() for b in stale), return_exceptions=True)
        for backend in backends:
            names.extend(backend.models or [])  # the last list it gave, if it is down now
        return list(dict.fromkeys(names))

    def unlisted_backends(self) -> list[str]:
        """The backends that have not yet answered /v1/models once: what they serve is not known, so a model
        missing from served_models() may still be theirs (a backend starting, or too slow under load)."""
        return [m.name for m in self.members if isinstance(m.engine, HttpEngine) and m.engine.models is None]

    def snapshot(self) -> list[dict[str, Any]]:
        """Each member's state and counters (for logs, benchmarks and, later, metrics)."""
        return [member.snapshot() for member in self.members]

    # ------------------------------------------------------------------------------------------ outcomes

    @staticmethod
    async def _call(member: Member, request_id: str, url: str, body: dict[str, Any], priority: int,
                    streaming: bool) -> Result | AsyncIterator[bytes]:
        # Passed on only when set, so an engine written before `priority` joined the protocol still works.
        options: dict[str, Any] = {"priority": priority} if priority else {}
        if streaming:
            outcome: Result | AsyncIterator[bytes] = await member.engine.stream(  # type: ignore[attr-defined]
                request_id, url, body, **options)
            return outcome
        return await member.engine.run(request_id, url, body, **options)

    def _succeeded(self, member: Member, seconds: float, result: Result | None) -> None:
        """An answer (None: a stream's first event) came back from a member."""
        member.completed += 1
        member.failures = 0
        if member.garbage:
            member.garbage *= GARBAGE_DECAY
            if member.garbage < 0.5:
                member.garbage, member.garbage_outs = 0.0, 0  # serving well again: forgiven
        if result is not None:  # the time to a stream's first event says little about the member's pace
            member.window.on_success(seconds, result.usage.output_tokens)

    def _failed(self, member: Member, error: EngineError, generation: int) -> None:
        member.failed_attempts += 1
        if member.state is not MemberState.UP or member.generation != generation:
            return  # already taken out (its other requests are failing with it), maybe already back
        if isinstance(error, BackendError) and error.bad_answer:
            member.bad_answers += 1
            member.garbage += 1.0
            if member.garbage >= GARBAGE_TO_DOWN:
                member.garbage_outs += 1
                self._take_out(member, f"{str(error).split(': ', 1)[-1]} (and others before it)")
                return
        if isinstance(error, BackendError) and not error.down:
            member.window.on_failure()
            if error.retry_after:
                self._slots.pause(member, error.retry_after)
            if error.busy:
                return  # a rate limit is not a fault: it stays in rotation, slower
            member.failures += 1
            if member.failures < FAILURES_TO_DOWN:
                return
        self._take_out(member, str(error))

    def _take_out(self, member: Member, reason: str) -> None:
        """Out of rotation: its requests in flight go back to the queue for the others; bring it back later."""
        if member.state is not MemberState.UP:
            return
        member.state, member.reason = MemberState.DOWN, reason
        member.taken_out += 1
        moving = list(member.inflight.values())
        log.error("%s %s is out of rotation (%s); %d request(s) in flight on it go to the others",
                  member.kind, member.name, reason, len(moving))
        for task in moving:
            self._moving.add(task)  # cancelled by us: whatever it returns is not the request's answer
            task.cancel()
        if not any(m.state is MemberState.UP for m in self.members):
            self._none_up_since = time.monotonic()
        if member.recovery is None or member.recovery.done():
            member.recovery = asyncio.create_task(self._recover(member), name=f"recover {member.name}")

    # ------------------------------------------------------------------------------------------ health

    async def _recover(self, member: Member, first: bool = False) -> None:
        """Bring a member (back) into rotation: an HTTP backend once it serves the model again, an engine or
        replica once restarted. Retries with a growing pause."""
        model = self._model
        assert model is not None
        pause = self.settings.backend_probe_seconds
        if not first:
            # Out for garbage answers: its health check may well pass, so it stays out longer each time.
            out = min(pause * 2 ** member.garbage_outs, MAX_RECOVERY_BACKOFF) if member.garbage_outs else 0.0
            await asyncio.sleep(max(out, pause if member.kind == "http" else 0))
        while True:
            try:
                if member.kind != "http":
                    await self._stop_member(member)  # a restart: release what the failed engine held
                await member.engine.start(model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                member.state = MemberState.DOWN
                member.reason = f"not served: {exc}" if isinstance(exc, ModelNotServed) else str(exc)
                log.warning("%s %s cannot serve %s yet (%s); trying again in %.1fs", member.kind, member.name,
                            model, member.reason, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RECOVERY_BACKOFF)
                continue
            if member.kind != "http":
                member.window.resize(member.engine.capacity)
                if self._affinity is not None:
                    self._affinity.forget(member.index)  # a restarted engine's cache is empty
            member.window.reset()
            member.state, member.reason = MemberState.UP, None
            member.generation += 1
            member.failures = member.probe_failures = 0
            member.garbage = 0.0
            member.paused_until = 0.0
            self._none_up_since = None
            log.info("%s %s is in rotation for %s (window %d of %d)", member.kind, member.name, model,
                     member.window.limit, member.window.cap)
            member.recovery = None
            self._slots.dispatch()
            return

    async def _watch_loop(self) -> None:
        """Health-check the members in rotation; end the wait of requests when nothing has served for too long."""
        period = self.settings.backend_probe_seconds
        while True:
            await asyncio.sleep(min(period, 1.0))
            now = time.monotonic()
            if (self._none_up_since is not None and self._slots.waiting
                    and now - self._none_up_since > self.settings.backend_wait_seconds):
                self._give_up_waiting()
            if now - self._last_probe < period:
                continue
            self._last_probe = now
            await asyncio.gather(*(self._probe(m) for m in self.members if m.state is MemberState.UP))

    async def _probe(self, member: Member) -> None:
        try:
            await asyncio.wait_for(member.engine.check_health(), self.settings.backend_probe_seconds)
            member.probe_failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            member.probe_failures += 1
            reason = str(exc) or f"no answer to a health check within {self.settings.backend_probe_seconds:g}s"
            if isinstance(exc, ModelNotServed) or member.probe_failures >= PROBES_TO_DOWN:
                self._take_out(member, reason)

    def _give_up_waiting(self) -> None:
        error = EngineError(f"no engine has been in rotation for {self.settings.backend_wait_seconds:g}s: "
                            f"{self._summary()}")
        log.error("%s", error)
        self._slots.fail_waiting(error)

    async def _stop_member(self, member: Member) -> None:
        try:
            await member.engine.stop()
        except Exception as exc:  # stopping a broken engine may fail too; it is being replaced anyway
            log.warning("stopping %s %s failed: %s", member.kind, member.name, exc)

    def _summary(self) -> str:
        return "; ".join(f"{m.name}: {m.state.value}" + (f" ({m.reason})" if m.reason else "")
                         for m in self.members)
