"""Result handlers for tests: they record every call in a journal file (one JSON line, fsynced), and fail,
hang or succeed as configured, so the tests can watch retries, timeouts and crashes from outside the server."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from vllm_batch_server.handlers import EndedBatch


def _record(journal: str, batch: EndedBatch, **extra: Any) -> int:
    """Append this call to the journal; returns how many calls for this batch it now holds."""
    entry = {"batch_id": batch.id, "status": batch.status, "event_id": batch.event_id, "attempt": batch.attempt,
             "at": time.time(), "pid": os.getpid(), **extra}
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return sum(1 for call in calls(journal) if call["batch_id"] == batch.id)


def calls(journal: str | Path) -> list[dict[str, Any]]:
    path = Path(journal)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class JournalHandler:
    """Fails the first `fail_times` calls for a batch, sleeps `sleep` seconds (blocking) on the calls listed in
    `sleep_on` (1-based, per batch), and otherwise succeeds, counting the results it was given."""

    def __init__(self, journal: str, fail_times: int = 0, sleep: float = 0.0,
                 sleep_on: list[int] | None = None) -> None:
        self.journal = journal
        self.fail_times = fail_times
        self.sleep = sleep
        self.sleep_on = set(sleep_on or [])

    def handle(self, batch: EndedBatch) -> None:
        results = sum(1 for _ in batch.results())
        call = _record(self.journal, batch, results=results, output=str(batch.output_path))
        if call in self.sleep_on:
            time.sleep(self.sleep)
        if call <= self.fail_times:
            raise RuntimeError(f"planned failure {call} of {self.fail_times}")


class AsyncJournalHandler:
    """The same, as a coroutine: waits `sleep` seconds without blocking the event loop."""

    def __init__(self, journal: str, sleep: float = 0.0) -> None:
        self.journal = journal
        self.sleep = sleep

    async def handle(self, batch: EndedBatch) -> None:
        _record(self.journal, batch)
        await asyncio.sleep(self.sleep)
