"""Online traffic as the scheduler sees it: how many requests are admitted, when the last one came.

The API admits an online request here before handing it to the engine (a bounded number at once: past it the
caller gets 429 with Retry-After, never a wait without end), and releases it when the answer is complete. The
scheduler reads the same object: it lets in-flight online requests finish before it stops the engine for a
model switch, and keeps `--online-model` loaded while online requests keep coming.
"""

from __future__ import annotations

import asyncio
import time

from vllm_batch_server.online_metrics import OnlineMetrics
from vllm_batch_server.settings import Settings


class OnlineTraffic:
    def __init__(self, settings: Settings, metrics: OnlineMetrics | None = None) -> None:
        self.limit = settings.online_max_requests
        self.metrics = metrics if metrics is not None else OnlineMetrics(models=settings.models)
        self.in_flight = 0
        self.last_arrival: float | None = None  # time.monotonic() of the last online request, any model
        self._idle = asyncio.Event()
        self._idle.set()

    def arrived(self) -> None:
        self.last_arrival = time.monotonic()

    def recent(self, seconds: float) -> bool:
        """Whether an online request arrived within the last `seconds`."""
        return self.last_arrival is not None and time.monotonic() - self.last_arrival < seconds

    def try_admit(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self._idle.clear()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until no online request is in flight (or `timeout` passed); whether none is."""
        waiter = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            waiter.cancel()
        return self.in_flight == 0
