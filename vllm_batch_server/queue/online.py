"""Online traffic as the scheduler sees it: how many requests are admitted, when the last one came.

The API admits an online request here before handing it to the engine (a bounded number at once: past it the
caller gets 429 with Retry-After, never a wait without end), and releases it when the answer is complete. The
scheduler reads the same object: it lets in-flight online requests finish before it stops the engine for a
model switch, and keeps `--online-model` loaded while online requests keep coming. Batch runners take a
turn from `batch_turns` for every request they send; while online requests are being answered, the turns are
limited to the window the latency controller learned (online_control.py), or to a fixed
`--online-batch-window` (see BatchTurns).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from vllm_batch_server.queue.online_control import HOLD_SECONDS, LatencyController, Sample
from vllm_batch_server.queue.online_metrics import OnlineMetrics
from vllm_batch_server.settings import Settings

# How long after the last online answer a fixed --online-batch-window stays in force: an app sending requests
# one after another leaves gaps of milliseconds, and refilling the engine with batch work in each would undo the
# narrowing. (The controller's window is kept longer: online_control.HOLD_SECONDS.)
NARROW_GRACE_SECONDS = 1.0
# How long an online request for a model that is not loaded keeps asking for it (callers retry within the
# Retry-After they were given, 10 s), and how long the loaded model must have had no online request of its own
# before the engine switches away from it for another's.
WANT_SECONDS = 30.0
SWITCH_QUIET_SECONDS = 5.0


class BatchTurns:
    """How many batch requests may be in the engine at once: no limit, except while online requests are being
    answered, when the latency controller's window or `--online-batch-window` applies.

    Priority scheduling puts online requests ahead of waiting batch requests, but a sequence already running
    keeps its place in every engine step. Where a step's cost grows with the number of sequences in it (a CPU;
    much less so a GPU), an online request beside a full batch decodes more slowly; narrowing the batch lets
    the running batch sequences finish without replacements, so steps shrink. Nothing is aborted or lost: a
    batch request waits for its turn before it is sent."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.in_flight = 0
        self.taken = 0  # turns ever given: an online answer with none given while it ran had the engine alone
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def narrowed(self) -> bool:
        return self.limit is not None

    def _full(self) -> bool:
        return self.limit is not None and self.in_flight >= self.limit

    async def take(self) -> None:
        if not self._full() and not self._waiting:
            self.in_flight += 1
            self.taken += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # the releaser counted us in
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give_back()
            raise

    def give_back(self) -> None:
        self.in_flight -= 1
        self._admit()

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        self._admit()

    def _admit(self) -> None:
        while self._waiting and not self._full():
            turn = self._waiting.popleft()
            if not turn.done():  # a waiter cancelled meanwhile is skipped
                self.in_flight += 1
                self.taken += 1
                turn.set_result(None)


@dataclass(frozen=True)
class Admission:
    """An admitted online request: when, and what batch work the engine held then."""

    started: float
    batch_in_flight: int
    batch_taken: int


class OnlineTraffic:
    def __init__(self, settings: Settings, metrics: OnlineMetrics | None = None,
                 capacity: Callable[[], int] | None = None) -> None:
        """`capacity`: the engine's (the runner's window when --window is not set), read when needed: vLLM
        reports its own once a model is loaded."""
        self.limit = settings.online_max_requests
        self.metrics = metrics if metrics is not None else OnlineMetrics(models=settings.models)
        self.in_flight = 0
        self.last_arrival: float | None = None  # time.monotonic() of the last online request, any model
        self._seen: dict[str, float] = {}  # model -> time.monotonic() of the last online request for it
        self._wanted: dict[str, float] = {}  # model -> the last request for it while it was not loaded
        self.batch_turns = BatchTurns()
        self._fixed = settings.online_batch_window
        self._window = settings.window
        self._capacity = capacity if capacity is not None else (lambda: 256)
        self.control = LatencyController(settings.online_latency_target, self.running_slots,
                                         enabled=self._fixed is None)
        # The fixed window is lifted a second after the last answer, as it always was; the controller's is
        # kept longer (see online_control.HOLD_SECONDS).
        self._hold = NARROW_GRACE_SECONDS if self._fixed is not None else HOLD_SECONDS
        self._active = False  # online requests being answered, or answered within the hold
        self._widen: asyncio.TimerHandle | None = None
        self.metrics.watch_control(window=self.batch_window, full=self.full_window,
                                   controller_window=self.controller_window,
                                   target=self.control.target if self.control.enabled else 0.0,
                                   ratio=lambda: self.control.ratio)

    def full_window(self) -> int:
        """Batch requests in the engine when nothing narrows them: the runner's window."""
        return max(1, self._window or self._capacity())

    def running_slots(self) -> int:
        """What a full batch runs at once: vLLM's max_num_seqs, half its window (the other half waits in its
        queue), unless --window is smaller."""
        return max(1, min(self.full_window(), self._capacity() // 2))

    def batch_window(self) -> int:
        """The batch window in force now (the full window when nothing narrows it)."""
        limit, full = self.batch_turns.limit, self.full_window()
        return full if limit is None else min(limit, full)

    def controller_window(self) -> int:
        """The window applied while online requests are answered (the full window when open)."""
        if self._fixed is not None:
            return self._fixed
        limit = self.control.limit()
        return self.full_window() if limit is None else limit

    def _apply(self) -> None:
        if not self._active:
            limit = None
        elif self._fixed is not None:
            limit = self._fixed
        else:
            limit = self.control.limit()
        self.batch_turns.set_limit(limit)

    def arrived(self, model: str | None = None) -> None:
        self.last_arrival = time.monotonic()
        if model is not None:
            self._seen[model] = self.last_arrival

    def want(self, model: str) -> None:
        """An online request asked for `model`, served here but not loaded (and no batch of it queued): the
        scheduler loads it when nothing else runs, as it would for a batch (see `wanted_model`)."""
        self._wanted[model] = time.monotonic()

    def wanted_model(self, loaded: str | None) -> str | None:
        """The model online requests asked for most recently within WANT_SECONDS, if not `loaded` — unless the
        loaded model answered an online request within SWITCH_QUIET_SECONDS (no switching back and forth
        under two callers' feet)."""
        now = time.monotonic()
        for model, at in list(self._wanted.items()):
            if now - at > WANT_SECONDS or model == loaded:
                del self._wanted[model]
        if not self._wanted:
            return None
        if loaded is not None and now - self._seen.get(loaded, -WANT_SECONDS * 10) < SWITCH_QUIET_SECONDS:
            return None
        return max(self._wanted, key=lambda model: self._wanted[model])

    def recent(self, seconds: float) -> bool:
        """Whether an online request arrived within the last `seconds`."""
        return self.last_arrival is not None and time.monotonic() - self.last_arrival < seconds

    def try_admit(self) -> Admission | None:
        """Admit an online request (None: the limit is reached); what the engine held then is kept for the
        controller's measurement."""
        if self.in_flight >= self.limit:
            return None
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        if self._widen is not None:
            self._widen.cancel()
            self._widen = None
        self._active = True
        self._apply()
        return Admission(time.monotonic(), self.batch_turns.in_flight, self.batch_turns.taken)

    def release(self, admission: Admission | None = None, *, model: str | None = None, endpoint: str | None = None,
                tokens: int | None = None) -> None:
        """An admitted request is done. With its model, endpoint and output tokens (a successful answer), its
        time per token is the controller's measurement."""
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if admission is not None and model is not None and endpoint is not None and tokens is not None:
            turns = self.batch_turns
            idle = admission.batch_in_flight == 0 and turns.in_flight == 0 and turns.taken == admission.batch_taken
            seconds = time.monotonic() - admission.started
            self.control.observe(Sample(model, endpoint, seconds / max(1, tokens), admission.batch_in_flight, idle))
            self.metrics.controlled(self.control)
        if self.in_flight == 0:
            self._widen = asyncio.get_running_loop().call_later(self._hold, self._widen_now)
        self._apply()

    def progress(self, admission: Admission, model: str, endpoint: str, tokens: int) -> bool:
        """A streamed answer has sent `tokens` so far: a very slow one narrows at once (online_control.py's
        observe_early). Whether the window changed."""
        seconds = time.monotonic() - admission.started
        changed = self.control.observe_early(Sample(model, endpoint, seconds / max(1, tokens),
                                                    admission.batch_in_flight, idle=False))
        if changed:
            self.metrics.controlled(self.control)
            self._apply()
        return changed

    def _widen_now(self) -> None:
        self._widen = None
        if self.in_flight == 0:
            self._active = False
            self._apply()
