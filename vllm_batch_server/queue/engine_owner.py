"""The one engine and which model it holds: starting, stopping, restarting, health.

The scheduler decides what runs; this object decides nothing about batches. The scheduler asks it whether the
engine is ready for a model (`ready_for`), asks it to load one (`load`, `keep`, `preload`), and tells it when
the engine failed under a batch (`failed`) or a batch stopped with requests still in it (`suspect`). The API
tells it when an online request found the engine broken (through `Scheduler.online_engine_failed`, which
also wakes the run loop). Readers (readiness, /status, metrics, the online routes) read `state`, `engine`,
`loading_model` and `load_error`.

Every load happens under one lock, from the scheduler's run loop or before it starts; the engine is stopped
only once the online requests in flight have their answers (new ones are refused meanwhile, see api/online.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import Enum
from typing import Protocol

from vllm_batch_server.engines.base import Engine
from vllm_batch_server.exhaustion import exhausted
from vllm_batch_server.queue.online import OnlineTraffic
from vllm_batch_server.settings import Settings

log = logging.getLogger(__name__)

# How long to wait before trying again to load the online model after it failed to load.
KEEP_MODEL_RETRY_SECONDS = 60.0


class EngineState(str, Enum):
    IDLE = "idle"  # no model loaded
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # died or hung: restarted before anything else runs on it


class EngineObserver(Protocol):
    """What the owner reports as it happens (metrics.py listens)."""

    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        """The engine has `model` loaded; `switched` from another model, or `restarted` after a failure."""


class _Unobserved:
    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        pass


class EngineOwner:
    def __init__(self, engine: Engine, settings: Settings, online: OnlineTraffic,
                 observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.online = online
        self.observer: EngineObserver = observer or _Unobserved()
        self.state = EngineState.IDLE
        self.loading_model: str | None = None  # while state is LOADING
        self.load_error: str | None = None  # why the last model load failed; None once one succeeds
        self._lock = asyncio.Lock()
        # A batch stopped with requests in flight (cancel, expiry): the engine answers a health check before
        # the next batch is given to it, so a wedged engine is restarted instead of stalling the queue.
        self._suspect = False
        self._last_model: str | None = None
        self._failed_under_online = False  # then restarted with _last_model even with no batch to run
        self._keep_failed_at: float | None = None

    # ---- what the scheduler asks -------------------------------------------------------------------------

    def serves(self, model: str | None) -> bool:
        """Whether the engine is ready with `model` loaded (no health check: see `ready_for`)."""
        return self.state is EngineState.READY and self.engine.model == model

    async def ready_for(self, model: str | None, *, idle: bool) -> bool:
        """Whether the engine may be given a batch of `model` now. A suspect engine is health-checked first,
        once nothing runs on it (`idle`); one that fails the check is marked failed (the caller restarts it)."""
        if self.serves(model):
            if not self._suspect:
                return True
            if idle:
                self._suspect = False
                if await self._healthy():
                    return True
        return False

    async def load(self, model: str) -> None:
        """(Re)start the engine with a batch's model. Raises what the start raised, leaving the engine idle; a
        model that cannot load (not a resource of ours that ran out) is reported by readiness."""
        async with self._lock:
            try:
                await self._start(model)
            except Exception as exc:
                if exhausted(exc) is None:
                    self.load_error = f"model {model!r} could not be loaded: {exc}"
                raise

    async def keep(self, model: str) -> None:
        """Load the model kept for online requests; a failure is logged and tried again later."""
        async with self._lock:
            try:
                await self._start(model)
                self._keep_failed_at = None
            except Exception:
                log.exception("could not load model %s for online requests; retrying in %.0fs", model,
                              KEEP_MODEL_RETRY_SECONDS)
                self._keep_failed_at = time.monotonic()

    async def preload(self, model: str) -> None:
        """Load a model before any batch asks for one. A model that cannot load leaves the engine idle with
        `load_error` set (readiness reports it)."""
        async with self._lock:
            try:
                await self._start(model)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await self.engine.stop()
                self.state = EngineState.IDLE
                self.load_error = f"model {model!r} could not be loaded: {exc}"
                log.exception("could not preload model %s", model)

    def model_to_keep(self) -> str | None:
        """With nothing to run: the model to have loaded anyway, if it is not — `--online-model`, or, after
        an online request found the engine failed, the model it had, or (without `--online-model`) the model
        online requests asked for last."""
        if self._keep_failed_at is not None and time.monotonic() - self._keep_failed_at < KEEP_MODEL_RETRY_SECONDS:
            return None  # it failed to load a moment ago: do not retry in a tight loop
        model = self.settings.online_model
        if model is None and self.state is EngineState.FAILED and self._failed_under_online:
            model = self._last_model
        if model is None and self.settings.online_model is None:
            # An online request asked for a served model that is not loaded: load it, as a batch of it would.
            model = self.online.wanted_model(self.engine.model if self.state is EngineState.READY else None)
        if model is None or self.serves(model):
            return None
        return model

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.engine.stop()

    # ---- what the scheduler and the API tell -------------------------------------------------------------

    def failed(self) -> None:
        """The engine failed under a batch: nothing more may be given to it until it is restarted."""
        self.state = EngineState.FAILED

    def suspect(self) -> None:
        """A batch stopped with requests in flight: check the engine's health before the next batch."""
        self._suspect = True

    def failed_under_online(self, exc: BaseException) -> None:
        """An online request found the engine broken: restart it before anything else runs on it (with no
        batch running, the run loop restarts it with the model it had)."""
        if self.state is EngineState.READY:
            log.error("the engine failed under an online request (%s); restarting it", exc)
            self.state = EngineState.FAILED
            self._failed_under_online = True

    # ---- inside ------------------------------------------------------------------------------------------

    async def _healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.engine.check_health(), self.settings.health_timeout)
            return True
        except Exception as exc:  # TimeoutError included: a wedged engine never answers
            log.error("the engine failed a health check after a batch stopped with requests in flight (%s); "
                      "restarting it", exc or f"no answer within {self.settings.health_timeout:g}s")
            self.state = EngineState.FAILED
            return False

    async def _start(self, model: str) -> None:
        """(Re)start the engine with `model`, reporting how long it took and why it happened. The engine is
        stopped once the online requests in flight have their answers (new ones are refused from now on).
        Raises what the start raised, leaving the engine idle."""
        restarted = self.state is EngineState.FAILED
        switched = not restarted and self.engine.model is not None and self.engine.model != model
        self.state = EngineState.LOADING
        self.loading_model = model
        try:
            if not await self.online.drained(self.settings.request_timeout):
                log.warning("stopping the engine with %d online requests still in flight",
                            self.online.in_flight)
            began = time.monotonic()
            await self.engine.stop()
            log.info("loading model %s", model)
            await self.engine.start(model)
            self.state = EngineState.READY
            self.load_error = None
            self._last_model = model
            self._failed_under_online = False
        except BaseException:
            with contextlib.suppress(Exception):
                await self.engine.stop()
            self.state = EngineState.IDLE
            raise
        finally:
            self.loading_model = None
        self.observer.model_loaded(model, time.monotonic() - began, switched=switched, restarted=restarted)
