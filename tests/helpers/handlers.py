"""Result handlers for tests, and helpers to configure them and watch their runs.

The handlers record every call in a journal file (one JSON line, fsynced), and fail, hang or succeed as
configured, so the tests can watch retries, timeouts and crashes from outside the server process."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_batch_server.handlers import EndedBatch

if TYPE_CHECKING:
    from tests.conftest import Server

REPO = Path(__file__).resolve().parents[2]


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


# ---- configuring handlers and watching their runs, from the test's side ------------------------------------


def handler_flags(**configs: Any) -> list[str]:
    """`--result-handler NAME=CONFIG` flags: a type name as it is, an object as JSON."""
    flags: list[str] = []
    for name, config in configs.items():
        flags += ["--result-handler", f"{name}={config if isinstance(config, str) else json.dumps(config)}"]
    return flags


def env_with_path(*extra: Path) -> dict[str, str]:
    """The server's environment for handlers imported from this repository (and `extra` directories)."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO), *map(str, extra)])}


def runs(server: Server, batch_id: str) -> list[dict[str, Any]]:
    response = server.http.get(f"{server.base_url}/batches/{batch_id}/handlers", timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return list(body["data"])


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


def run_of(server: Server, batch_id: str, name: str, status: str, timeout: float = 30) -> dict[str, Any]:
    """The run of handler `name` on the batch once it has `status` (waiting up to `timeout`)."""
    def found() -> dict[str, Any] | None:
        return next((r for r in runs(server, batch_id) if r["name"] == name and r["status"] == status), None)

    return dict(wait_until(found, timeout, f"handler {name} {status} on {batch_id}: {runs(server, batch_id)}"))
