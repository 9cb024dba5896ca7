"""Live numbers for /status and /metrics: batches by status, committed requests and tokens, throughput.

All of them are read from SQLite, where checkpoints already record every batch's committed progress, so the
request path pays nothing for them. A snapshot is taken at most once a second however often it is asked for
(a dashboard polling /status, Prometheus scraping /metrics), and every few seconds in the background so the
throughput over the last half minute is known even when nobody asks.

Summing every batch's counters is a scan of the batches table: well under a millisecond for thousands of
batches, a few tens at a hundred thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from vllm_batch_server.database import Database

log = logging.getLogger(__name__)

FRESH_SECONDS = 1.0  # a snapshot younger than this is served as it is
SAMPLE_SECONDS = 5.0  # background sampling, for the throughput
THROUGHPUT_WINDOW = 30.0  # throughput is the average over this many seconds


@dataclass(frozen=True)
class Total:
    model: str
    endpoint: str
    completed: int
    failed: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: float = 0.0  # time.monotonic(); 0: never
    batch_counts: dict[str, int] = field(default_factory=dict)
    totals: tuple[Total, ...] = ()
    pending_deliveries: int = 0

    @property
    def results(self) -> int:
        return sum(t.completed + t.failed for t in self.totals)

    @property
    def output_tokens(self) -> int:
        return sum(t.output_tokens for t in self.totals)


class Monitor:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.latest = Snapshot()
        self._samples: deque[Snapshot] = deque()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample_loop(), name="monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def snapshot(self) -> Snapshot:
        """A snapshot at most FRESH_SECONDS old."""
        async with self._lock:  # concurrent callers share one read
            if time.monotonic() - self.latest.taken_at >= FRESH_SECONDS:
                await self._take()
        return self.latest

    async def _take(self) -> None:
        counts = await self._db.batch_counts()
        totals = tuple(Total(row["model"], row["endpoint"], int(row["completed"] or 0), int(row["failed"] or 0),
                             int(row["input_tokens"] or 0), int(row["cached_tokens"] or 0),
                             int(row["output_tokens"] or 0)) for row in await self._db.request_totals())
        pending = await self._db.pending_deliveries()
        self.latest = Snapshot(time.monotonic(), counts, totals, pending)
        self._samples.append(self.latest)
        # Keep one sample older than the window, so the average always spans the whole window once it can.
        while len(self._samples) > 2 and self.latest.taken_at - self._samples[1].taken_at >= THROUGHPUT_WINDOW:
            self._samples.popleft()

    def throughput(self) -> tuple[float, float]:
        """(requests, output tokens) per second over about the last THROUGHPUT_WINDOW seconds."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        first, last = self._samples[0], self._samples[-1]
        elapsed = last.taken_at - first.taken_at
        if elapsed <= 0:
            return 0.0, 0.0
        return (max(0, last.results - first.results) / elapsed,
                max(0, last.output_tokens - first.output_tokens) / elapsed)

    async def _sample_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a locked or full database: the next sample will do
                await self.snapshot()
            await asyncio.sleep(SAMPLE_SECONDS)
