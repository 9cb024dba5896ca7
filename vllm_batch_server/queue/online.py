"""Online traffic as the scheduler sees it: how many requests are admitted, when the last one came.

The API admits an online request here before handing it to the engine (a bounded number at once: past it the
caller gets 429 with Retry-After, never a wait without end), and releases it when the answer is complete. The
scheduler reads the same object: it lets in-flight online requests finish before it stops the engine for a
model switch, and keeps `--online-model` loaded while online requests keep coming. Batch runners take a
turn from `batch_turns` for every request they send, which `--online-batch-window` narrows while online
requests are being answered (see BatchTurns).
"""

from __future__ import annotations

import asyncio
import collections
import time

from vllm_batch_server.queue.online_metrics import OnlineMetrics
from vllm_batch_server.settings import Settings

# How long after the last online answer batch work stays narrowed: an app sending requests one after another
# leaves gaps of milliseconds, and refilling the engine with batch work in each would undo the narrowing.
NARROW_GRACE_SECONDS = 1.0
# How long an online request for a model that is not loaded keeps asking for it (callers retry within the
# Retry-After they were given, 10 s), and how long the loaded model must have had no online request of its own
# before the engine switches away from it for another's.
WANT_SECONDS = 30.0
SWITCH_QUIET_SECONDS = 5.0


class BatchTurns:
    """How many batch requests may be in the engine at once: unlimited, except while online requests are being
    answered (and for a grace second after), when at most `--online-batch-window`.

    Priority scheduling puts online requests ahead of waiting batch requests, but a sequence already running
    keeps its place in every engine step. Where a step's cost grows with the number of sequences in it (a CPU;
    much less so a GPU), an online request beside a full batch decodes more slowly; narrowing the batch lets
    the running batch sequences finish without replacements, so steps shrink. Nothing is aborted or lost: a
    batch request waits for its turn before it is sent."""

    def __init__(self, narrow_to: int | None) -> None:
        self.narrow_to = narrow_to
        self.narrowed = False
        self.in_flight = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def _full(self) -> bool:
        return self.narrowed and self.narrow_to is not None and self.in_flight >= self.narrow_to

    async def take(self) -> None:
        if not self._full() and not self._waiting:
            self.in_flight += 1
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

    def narrow(self, on: bool) -> None:
        self.narrowed = on
        self._admit()

    def _admit(self) -> None:
        while self._waiting and not self._full():
            turn = self._waiting.popleft()
            if not turn.done():  # a waiter cancelled meanwhile is skipped
                self.in_flight += 1
                turn.set_result(None)


class OnlineTraffic:
    def __init__(self, settings: Settings, metrics: OnlineMetrics | None = None) -> None:
        self.limit = settings.online_max_requests
        self.metrics = metrics if metrics is not None else OnlineMetrics(models=settings.models)
        self.in_flight = 0
        self.last_arrival: float | None = None  # time.monotonic() of the last online request, any model
        self._seen: dict[str, float] = {}  # model -> time.monotonic() of the last online request for it
        self._wanted: dict[str, float] = {}  # model -> the last request for it while it was not loaded
        self.batch_turns = BatchTurns(settings.online_batch_window)
        self._idle = asyncio.Event()
        self._idle.set()
        self._widen: asyncio.TimerHandle | None = None

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

    def try_admit(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self._idle.clear()
        if self._widen is not None:
            self._widen.cancel()
            self._widen = None
        self.batch_turns.narrow(True)
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()
            if self.batch_turns.narrow_to is not None:
                self._widen = asyncio.get_running_loop().call_later(NARROW_GRACE_SECONDS, self._widen_now)

    def _widen_now(self) -> None:
        self._widen = None
        if self.in_flight == 0:
            self.batch_turns.narrow(False)

    async def drained(self, timeout: float) -> bool:
        """Wait until no online request is in flight (or `timeout` passed); whether none is."""
        waiter = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            waiter.cancel()
        return self.in_flight == 0
