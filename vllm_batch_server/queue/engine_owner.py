"""The engines and the models they hold: starting, stopping, restarting, health, which model goes where.

With `--max-loaded-models N` (default 1) up to N models are loaded side by side, one engine each (a `Slot`).
The scheduler decides what runs; this object decides nothing about batches. The scheduler asks it which slot
serves a model (`serving`, `holding`, `ready_in`), claims a slot for a model that is not ready (`claim`: which
engine to start, restart or wake, and which idle ones to unload or put to sleep first), and has the claim
carried out (`bring`). It tells it when an engine failed under a batch (`failed`) or a batch stopped with
requests still in it (`suspect`). The API tells it when an online request found an engine broken (through
`Scheduler.online_engine_failed`, which also wakes the run loop) and counts the online requests each engine
is answering (`online_began`, `online_ended`). Readers (readiness, /status, metrics, the online routes) read
`slots`, and, as with one engine, `state`, `engine`, `loading_model` and `load_error`.

A claim marks its slots at once, before any await, so nothing else starts on an engine about to be unloaded;
the work (stop, start, sleep, wake) then happens under one lock, one load at a time, while batches of the
other engines keep running. An engine is stopped only once the online requests in flight on it have their
answers (new ones are refused meanwhile, see api/online.py).

With `--max-sleeping-models K` (vLLM's sleep mode, GPUs only), an evicted model's engine is put to sleep
(its weights parked in CPU memory) instead of stopped, and woken when a batch needs it again: at most N
engines awake, K asleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from vllm_batch_server.engines.base import Engine, SleepingEngine
from vllm_batch_server.exhaustion import exhausted
from vllm_batch_server.queue.online import SWITCH_QUIET_SECONDS, OnlineTraffic
from vllm_batch_server.settings import Settings

log = logging.getLogger(__name__)

# How long to wait before trying again to load the online model after it failed to load.
KEEP_MODEL_RETRY_SECONDS = 60.0


class EngineState(str, Enum):
    IDLE = "idle"  # no model loaded
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # died or hung: restarted before anything else runs on it
    ASLEEP = "asleep"  # vLLM's sleep mode: weights parked in CPU memory, woken before it serves again


AWAKE = (EngineState.LOADING, EngineState.READY, EngineState.FAILED)


class EngineObserver(Protocol):
    """What the owner reports as it happens (metrics.py listens)."""

    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        """An engine has `model` loaded; `switched` from another model, or `restarted` after a failure."""

    def model_slept(self, model: str) -> None:
        """An idle engine holding `model` was put to sleep to make room for another model."""

    def model_woken(self, model: str, seconds: float) -> None:
        """A sleeping engine holding `model` was woken, taking `seconds`."""


class _Unobserved:
    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        pass

    def model_slept(self, model: str) -> None:
        pass

    def model_woken(self, model: str, seconds: float) -> None:
        pass


@dataclass(eq=False)
class Slot:
    """One engine and the model it holds."""

    engine: Engine
    state: EngineState = EngineState.IDLE
    loading_model: str | None = None  # while LOADING: the model it is being given
    # A batch stopped with requests in flight (cancel, expiry): the engine answers a health check before the
    # next batch is given to it, so a wedged engine is restarted instead of stalling the queue.
    suspect: bool = False
    failed_under_online: bool = False  # then restarted with last_model even with no batch to run
    last_model: str | None = None
    used_at: float = 0.0  # time.monotonic() a batch or an online request last used it: the least recent goes
    online_at: float = -math.inf  # time.monotonic() of its last online request
    online_in_flight: int = 0
    online_idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.online_idle.set()

    @property
    def model(self) -> str | None:
        """The model it serves, was serving when it failed, or sleeps with."""
        return self.engine.model if self.state is not EngineState.IDLE else None

    def serves(self, model: str | None) -> bool:
        return self.state is EngineState.READY and self.engine.model == model

    def holds(self, model: str | None) -> bool:
        """Whether it has `model` (ready, failed, asleep) or is loading it."""
        if self.state is EngineState.LOADING:
            return self.loading_model == model
        return self.model is not None and self.model == model


@dataclass
class Claim:
    """What `bring` will do: unload or put to sleep `victims` (idle engines), then start `model` on `target` —
    or wake it there, when `target` sleeps with it."""

    model: str
    target: Slot
    victims: list[Slot]
    wake: bool
    restart: bool = False  # the target failed with this model: a restart, not a switch
    asleep: list[Slot] = field(default_factory=list)  # the victims put to sleep rather than stopped


class EngineOwner:
    def __init__(self, engine: Engine, settings: Settings, online: OnlineTraffic,
                 observer: EngineObserver | None = None, make_engine: Callable[[], Engine] | None = None) -> None:
        self.settings = settings
        self.online = online
        self.observer: EngineObserver = observer or _Unobserved()
        # Without a way to build more engines (a router, a test's scheduler), one engine, as before.
        self._make_engine = make_engine
        self.max_loaded = max(1, settings.max_loaded_models) if make_engine is not None else 1
        self.max_sleeping = (settings.max_sleeping_models if make_engine is not None
                             and isinstance(engine, SleepingEngine) else 0)
        self._slots: list[Slot] = [Slot(engine)]
        self.load_error: str | None = None  # why the last model load failed; None once one succeeds
        self._lock = asyncio.Lock()
        self._keep_failed_at: float | None = None
        # Models that failed to load beside others: loaded alone next time (every other engine unloaded).
        self._alone: set[str] = set()

    # ---- what readers read -------------------------------------------------------------------------------

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(self._slots)

    @property
    def primary(self) -> Slot:
        """The slot the single-engine readers describe (`engine`, `state`, /health's loaded_model): the one
        used last among those holding a model; with one engine, that engine."""
        held = ([slot for slot in self._slots if slot.state in AWAKE]
                or [slot for slot in self._slots if slot.state is EngineState.ASLEEP])
        return max(held, key=lambda slot: slot.used_at) if held else self._slots[0]

    @property
    def engine(self) -> Engine:
        return self.primary.engine

    @property
    def state(self) -> EngineState:
        loading = [slot for slot in self._slots if slot.state is EngineState.LOADING]
        return loading[0].state if loading else self.primary.state

    @property
    def loading_model(self) -> str | None:
        return next((slot.loading_model for slot in self._slots if slot.state is EngineState.LOADING), None)

    def serving(self, model: str | None) -> Slot | None:
        """The slot ready with `model` loaded (no health check: see `ready_in`)."""
        return next((slot for slot in self._slots if slot.serves(model)), None)

    def holding(self, model: str | None) -> Slot | None:
        """The slot that has `model` in any state (ready, failed, asleep) or is loading it."""
        return next((slot for slot in self._slots if slot.holds(model)), None)

    def engine_for(self, model: str | None) -> Engine | None:
        slot = self.serving(model)
        return slot.engine if slot is not None else None

    def resident(self) -> list[Slot]:
        """The slots holding or loading a model, awake ones first, each group least recently used first."""
        return sorted((slot for slot in self._slots if slot.state is not EngineState.IDLE),
                      key=lambda slot: (slot.state is EngineState.ASLEEP, slot.used_at))

    # ---- what the scheduler asks -------------------------------------------------------------------------

    def serves(self, model: str | None) -> bool:
        return self.serving(model) is not None

    async def ready_in(self, slot: Slot, *, idle: bool) -> bool:
        """Whether `slot` may be given a batch of its model now. A suspect engine is health-checked first, once
        nothing runs on it (`idle`); one that fails the check is marked failed (the caller restarts it)."""
        if slot.state is not EngineState.READY:
            return False
        if not slot.suspect:
            return True
        if idle:
            slot.suspect = False
            if await self._healthy(slot):
                return True
        return False

    def used(self, slot: Slot) -> None:
        slot.used_at = time.monotonic()

    def claim(self, model: str, busy: Callable[[Slot], bool], *, prefetch: bool = False,
              needed: Collection[str] = ()) -> Claim | None:
        """Claim a slot for `model` if one can be had now without touching a running batch: the one that
        holds it (failed: restarted; asleep: woken), else an empty one, else the least recently used idle
        engine, unloaded or put to sleep. None when every candidate runs a batch (or, for a prefetch, when
        only an engine a queued batch (`needed`) or recent online requests use could make room). The slots
        are marked at once: nothing else starts on them until `bring` has run."""
        held = self.holding(model)
        if held is not None and held.state is EngineState.LOADING:
            return None  # already on its way
        if held is not None and held.state in (EngineState.READY, EngineState.FAILED):
            if busy(held):
                return None  # never restart an engine under a running batch
            return self._mark(Claim(model, held, [], wake=False))
        awake = [slot for slot in self._slots if slot.state in AWAKE]
        victims: list[Slot] = []
        if model in self._alone and len(self._slots) > 1:
            victims = [slot for slot in awake if slot is not held]
            if any(busy(slot) or slot.state is EngineState.LOADING or slot.online_in_flight for slot in victims):
                return None
        elif len(awake) >= self.max_loaded:
            victim = self._victim(awake, busy, prefetch=prefetch, needed=needed)
            if victim is None:
                return None
            victims = [victim]
        if held is not None:  # asleep with it
            return self._mark(Claim(model, held, victims, wake=True))
        target = self._free_slot(victims)
        return self._mark(Claim(model, target, [v for v in victims if v is not target], wake=False))

    def _victim(self, awake: list[Slot], busy: Callable[[Slot], bool], *, prefetch: bool,
                needed: Collection[str]) -> Slot | None:
        """The awake engine to unload (or put to sleep) for another model: a failed one first, then one no
        queued batch needs, then the least recently used; never one running a batch, nor the --online-model
        while online requests keep coming (with several models loaded, batches of others do not wait for it)."""
        now = time.monotonic()
        candidates = [slot for slot in awake if slot.state is not EngineState.LOADING and not busy(slot)
                      and not self._protected(slot)]
        if prefetch:  # only what nobody is about to use
            candidates = [slot for slot in candidates if slot.model not in needed
                          and now - slot.online_at >= SWITCH_QUIET_SECONDS]
        if not candidates:
            return None
        return min(candidates, key=lambda slot: (slot.state is not EngineState.FAILED, slot.model in needed,
                                                 slot.used_at))

    def _protected(self, slot: Slot) -> bool:
        pinned = self.settings.online_model
        return (self.max_loaded > 1 and pinned is not None and slot.model == pinned
                and self.online.recent(self.settings.online_idle_seconds))

    def _free_slot(self, victims: list[Slot]) -> Slot:
        """Where a model not held anywhere is started: an empty slot, or a new one while there is room for it,
        or (when victims are stopped rather than put to sleep) the victim itself, or the least recently used
        sleeping engine, whose model is dropped."""
        empty = next((slot for slot in self._slots if slot.state is EngineState.IDLE and slot not in victims), None)
        if empty is not None:
            return empty
        if len(self._slots) < self.max_loaded + self.max_sleeping and self._make_engine is not None:
            slot = Slot(self._make_engine())
            self._slots.append(slot)
            return slot
        if victims and not self.max_sleeping:
            return victims[0]
        asleep = [slot for slot in self._slots if slot.state is EngineState.ASLEEP and slot not in victims]
        if asleep:
            return min(asleep, key=lambda slot: slot.used_at)
        return victims[0]  # sleeping is allowed, yet nothing else is free: unload the victim instead

    def _mark(self, claim: Claim) -> Claim:
        # A failed engine started again, with its model or another: a restart (as with one engine).
        claim.restart = claim.target.state is EngineState.FAILED or claim.target.failed_under_online
        for victim in claim.victims:
            # Taken out of service now; `bring` puts it to sleep or stops it.
            if self._may_sleep(victim):
                claim.asleep.append(victim)
                victim.state = EngineState.ASLEEP
            else:
                victim.state = EngineState.IDLE
        claim.target.state = EngineState.LOADING
        claim.target.loading_model = claim.model
        return claim

    def _may_sleep(self, slot: Slot) -> bool:
        return (self.max_sleeping > 0 and slot.state is EngineState.READY and not slot.suspect
                and isinstance(slot.engine, SleepingEngine))

    async def bring(self, claim: Claim) -> None:
        """Carry out a claim: the victims' online requests are answered, then each is put to sleep or
        stopped, then the target is woken or started. Raises what the start raised, leaving the target idle."""
        async with self._lock:
            for victim in claim.victims:
                await self._release(victim, sleep=victim in claim.asleep)
            if claim.wake and await self._wake(claim.target, claim.model):
                return
            try:
                await self._start(claim.target, claim.model, restarted=claim.restart)
            except Exception as exc:
                others = [slot for slot in self._slots if slot is not claim.target and slot.state in AWAKE]
                if others and exhausted(exc) is None and claim.model not in self._alone:
                    # Perhaps it did not fit beside them: the next attempt loads it alone, as one engine would.
                    self._alone.add(claim.model)
                    log.warning("model %s could not be loaded beside %s (%s); it will be loaded alone next",
                                claim.model, ", ".join(str(slot.model) for slot in others), exc)
                    raise RetryAlone(claim.model) from exc
                if exhausted(exc) is None:
                    self.load_error = f"model {claim.model!r} could not be loaded: {exc}"
                raise

    async def load(self, model: str) -> None:
        """(Re)start an engine with `model`, nothing running (before the scheduler starts)."""
        claim = self.claim(model, lambda slot: False)
        if claim is not None:
            await self.bring(claim)

    def keep_failed(self) -> None:
        """Loading the model kept for online requests failed: try again later, not in a tight loop."""
        self._keep_failed_at = time.monotonic()

    def keep_loaded(self) -> None:
        self._keep_failed_at = None

    async def preload(self, model: str) -> None:
        """Load a model before any batch asks for one. A model that cannot load leaves its engine idle with
        `load_error` set (readiness reports it)."""
        try:
            await self.load(model)
        except Exception as exc:
            self.load_error = f"model {model!r} could not be loaded: {exc}"
            log.exception("could not preload model %s", model)

    def model_to_keep(self) -> str | None:
        """With nothing to run: the model to have loaded anyway, if it is not — `--online-model`, or, after
        an online request found an engine failed, the model it had, or (without `--online-model`) the model
        online requests asked for last."""
        if self._keep_failed_at is not None and time.monotonic() - self._keep_failed_at < KEEP_MODEL_RETRY_SECONDS:
            return None  # it failed to load a moment ago: do not retry in a tight loop
        model = self.settings.online_model
        if model is None:
            model = next((slot.last_model for slot in self._slots
                          if slot.state is EngineState.FAILED and slot.failed_under_online), None)
        if model is None and self.settings.online_model is None:
            # An online request asked for a served model that is not loaded: load it, as a batch of it would.
            if self.max_loaded == 1:
                primary = self.primary
                model = self.online.wanted_model(primary.engine.model if primary.state is EngineState.READY
                                                 else None)
            else:
                for slot in self._slots:
                    if slot.state is EngineState.READY:
                        self.online.wanted_model(slot.engine.model)  # forgets the wants already met
                # No quiet period to respect: the least recently used idle engine makes room (see _victim).
                model = self.online.wanted_model(None)
        if model is None or self.serves(model):
            return None
        held = self.holding(model)
        if held is not None and held.state is EngineState.LOADING:
            return None
        return model

    async def stop(self) -> None:
        for slot in self._slots:
            with contextlib.suppress(Exception):
                await slot.engine.stop()

    # ---- what the scheduler and the API tell -------------------------------------------------------------

    def failed(self, slot: Slot) -> None:
        """The engine failed under a batch: nothing more may be given to it until it is restarted."""
        slot.state = EngineState.FAILED

    def suspect(self, slot: Slot) -> None:
        """A batch stopped with requests in flight: check the engine's health before the next batch."""
        slot.suspect = True

    def failed_under_online(self, exc: BaseException, model: str | None = None) -> None:
        """An online request found an engine broken: restart it before anything else runs on it (with no
        batch running, the run loop restarts it with the model it had)."""
        slot = self.serving(model) if model is not None else self.primary
        if slot is not None and slot.state is EngineState.READY:
            log.error("the engine of %s failed under an online request (%s); restarting it", slot.model, exc)
            slot.state = EngineState.FAILED
            slot.failed_under_online = True

    def online_began(self, model: str) -> Slot | None:
        """An online request for `model` is admitted: the engine serving it is not stopped until it ends."""
        slot = self.serving(model)
        if slot is not None:
            slot.online_in_flight += 1
            slot.online_idle.clear()
            slot.online_at = slot.used_at = time.monotonic()
        return slot

    def online_ended(self, slot: Slot) -> None:
        slot.online_in_flight -= 1
        if slot.online_in_flight <= 0:
            slot.online_in_flight = 0
            slot.online_idle.set()

    # ---- inside ------------------------------------------------------------------------------------------

    async def _healthy(self, slot: Slot) -> bool:
        try:
            await asyncio.wait_for(slot.engine.check_health(), self.settings.health_timeout)
            return True
        except Exception as exc:  # TimeoutError included: a wedged engine never answers
            log.error("the engine of %s failed a health check after a batch stopped with requests in flight "
                      "(%s); restarting it", slot.model,
                      exc or f"no answer within {self.settings.health_timeout:g}s")
            slot.state = EngineState.FAILED
            return False

    async def _drained(self, slot: Slot) -> None:
        """Wait for the online requests on `slot` to be answered (up to --request-timeout)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slot.online_idle.wait(), self.settings.request_timeout)
        if slot.online_in_flight:
            log.warning("stopping the engine of %s with %d online requests still in flight", slot.engine.model,
                        slot.online_in_flight)

    async def _release(self, slot: Slot, *, sleep: bool) -> None:
        """A victim, put to sleep or stopped as its claim marked it. (A later claim may have taken it
        meanwhile, to wake it or to start another model on it: its state is then that claim's.)"""
        await self._drained(slot)
        model = slot.engine.model
        if sleep and isinstance(slot.engine, SleepingEngine):
            try:
                await slot.engine.sleep()
                log.info("model %s put to sleep", model)
                if model is not None:
                    self.observer.model_slept(model)
                return
            except Exception as exc:
                log.error("model %s could not be put to sleep (%s); unloading it", model, exc)
                if slot.state is EngineState.ASLEEP:
                    slot.state = EngineState.IDLE
        log.info("unloading model %s", model)
        with contextlib.suppress(Exception):
            await slot.engine.stop()

    async def _wake(self, slot: Slot, model: str) -> bool:
        """Wake a sleeping engine; whether it woke (if not, it is stopped and the caller starts it afresh)."""
        engine = slot.engine
        assert isinstance(engine, SleepingEngine)
        began = time.monotonic()
        try:
            await engine.wake_up()
        except Exception as exc:
            log.error("model %s could not be woken (%s); loading it afresh", model, exc)
            with contextlib.suppress(Exception):
                await slot.engine.stop()
            return False
        slot.state = EngineState.READY
        slot.loading_model = None
        slot.last_model = model
        self.load_error = None
        seconds = time.monotonic() - began
        log.info("model %s woken in %.1f s", model, seconds)
        self.observer.model_woken(model, seconds)
        return True

    async def _start(self, slot: Slot, model: str, *, restarted: bool = False) -> None:
        """(Re)start the slot's engine with `model`, reporting how long it took and why it happened. The
        engine is stopped once the online requests in flight on it have their answers (new ones are refused
        from now on). Raises what the start raised, leaving the slot idle."""
        switched = not restarted and slot.engine.model is not None and slot.engine.model != model
        slot.state = EngineState.LOADING
        slot.loading_model = model
        try:
            await self._drained(slot)
            began = time.monotonic()
            await slot.engine.stop()
            log.info("loading model %s", model)
            await slot.engine.start(model)
            slot.state = EngineState.READY
            slot.suspect = False
            slot.last_model = model
            slot.failed_under_online = False
            slot.used_at = time.monotonic()
            self.load_error = None
            self._alone.discard(model)
        except BaseException:
            with contextlib.suppress(Exception):
                await slot.engine.stop()
            slot.state = EngineState.IDLE
            raise
        finally:
            slot.loading_model = None
        self.observer.model_loaded(model, time.monotonic() - began, switched=switched, restarted=restarted)


class RetryAlone(Exception):
    """A model failed to load beside others: not the batch's fault yet; it is loaded alone next time."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} could not be loaded beside the others; retrying alone")
        self.model = model
