"""Die at each step of finalizing and of a cancel's tail, then recover: the steps take milliseconds, so instead
of a kill from outside, the scheduler runs in-process and a patched step raises `Died` (a BaseException the
server's handlers cannot catch). The dead scheduler is abandoned without any shutdown code running, as after
kill -9, and a fresh one on the same data directory must finish the job.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chat_lines, jsonl
from vllm_batch_server import ids
from vllm_batch_server.aio import wait_event
from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.queue import scheduler as scheduler_module
from vllm_batch_server.queue.scheduler import Scheduler
from vllm_batch_server.settings import Settings
from vllm_batch_server.statuses import TERMINAL, BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow, CheckpointCommitter, Database, FileRow
from vllm_batch_server.store.lifecycle import Lifecycle

N = 60


class Died(BaseException):
    """The process died here."""


def settings_for(data_dir: Path, delay: float = 0.0) -> Settings:
    return Settings(data_dir=data_dir, engine="echo", models=["echo-model"], checkpoint_every=4,
                    checkpoint_seconds=0.1, window=4, echo_delay=delay, sweep_seconds=0.1)


async def open_server(settings: Settings) -> tuple[Database, Blobs, Scheduler]:
    blobs = Blobs(settings.data_dir)
    blobs.prepare()
    db = await Database.open(settings.db_path)
    scheduler = Scheduler(db, blobs, EchoEngine(settings), settings, Lifecycle(db))
    await scheduler.start()
    return db, blobs, scheduler


async def abandon(db: Database, scheduler: Scheduler) -> None:
    """What kill -9 leaves: nothing more runs; only what was committed counts."""
    tasks = [*scheduler._tasks, *scheduler._drivers]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await db.close()


async def add_batch(scheduler: Scheduler, lines: list[dict[str, Any]]) -> str:
    """What the create routes do: store the input file, then submit the batch."""
    db, blobs = scheduler.db, scheduler.blobs
    file_id = ids.new_file_id()
    blobs.file_path(file_id).write_bytes(jsonl(lines))
    await db.insert_file(FileRow(id=file_id, filename="in.jsonl", purpose="batch",
                                    bytes=len(jsonl(lines)), created_at=int(time.time())))
    batch = BatchRow(id=ids.new_batch_id(), endpoint="/v1/chat/completions", input_file_id=file_id,
                     completion_window="24h", status=BatchStatus.VALIDATING, created_at=int(time.time()),
                     expires_at=int(time.time()) + 86400)
    await scheduler.submit(batch)
    return batch.id


async def wait_status(db: Database, batch_id: str, statuses: tuple[str, ...], timeout: float = 20) -> BatchRow:
    deadline = time.monotonic() + timeout
    while True:
        batch = await db.get_batch(batch_id)
        assert batch is not None
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"still {batch.status}"
        await asyncio.sleep(0.02)


def lines_with_errors() -> list[dict[str, Any]]:
    lines = chat_lines(N)
    for i in range(0, N, 5):
        lines[i]["body"]["messages"] = []  # an error line from the engine: both result files exist
    return lines


def die_at(scheduler: Scheduler, point: str, died: asyncio.Event) -> None:
    """Patch the step named by `point` on these instances so the process 'dies' there."""
    loop = asyncio.get_running_loop()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # The dead driver task's `Died` is never retrieved. Left to the default handler, it is logged from
        # the task's __del__, and on Python 3.11 formatting that traceback inside a garbage collection that
        # interrupts an ast.parse (pytest rewriting a module) trips "AST constructor recursion depth mismatch".
        if not isinstance(context.get("exception"), Died):
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
    blobs, lifecycle = scheduler.blobs, scheduler.lifecycle
    real_promote, real_move, real_remove = blobs.promote_part, lifecycle.move, blobs.remove_batch_dir
    calls = Counter[str]()

    def promote(part: Path, offset: int, file_id: str) -> int:
        calls["promote"] += 1
        if point == "before-first-rename" or (point == "between-renames" and calls["promote"] == 2):
            died.set()
            raise Died
        return real_promote(part, offset, file_id)

    async def move(batch_id: str, to: BatchStatus, **kwargs: Any) -> bool:
        if point == "before-commit" and to in TERMINAL:  # the commit that ends the batch
            died.set()
            raise Died
        return await real_move(batch_id, to, **kwargs)

    def remove(batch_id: str) -> None:
        if point == "before-cleanup":
            died.set()
            raise Died
        real_remove(batch_id)

    blobs.promote_part = promote  # type: ignore[method-assign]
    lifecycle.move = move  # type: ignore[method-assign]
    blobs.remove_batch_dir = remove  # type: ignore[method-assign]


async def check_recovered(settings: Settings, batch_id: str, status: str, exactly_once: bool) -> None:
    db, blobs, scheduler = await open_server(settings)
    try:
        batch = await wait_status(db, batch_id, (status,))
        registered = {f.id: f for f in await db.list_files(after_seq=None, limit=100, descending=False,
                                                              purpose="batch_output")}
        seen: Counter[str] = Counter()
        for file_id in (batch.output_file_id, batch.error_file_id):
            assert file_id is not None and file_id in registered
            data = blobs.file_path(file_id).read_bytes()
            assert len(data) == registered[file_id].bytes  # the row describes the file on disk
            seen.update(json.loads(line)["custom_id"] for line in data.splitlines())
        assert all(n == 1 for n in seen.values())
        assert sum(seen.values()) == batch.completed + batch.failed
        if exactly_once:
            assert set(seen) == {f"req-{i}" for i in range(N)}
        assert not blobs.batch_dir(batch_id).exists()  # no leftover parts, whatever the crash point
        # nothing unregistered is left behind in files/
        assert blobs.stored_file_ids() == await db.all_file_ids()
    finally:
        await scheduler.stop()
        await db.close()


@pytest.mark.parametrize("point", ["before-first-rename", "between-renames", "before-commit", "before-cleanup"])
def test_death_during_finalizing(tmp_path: Path, point: str) -> None:
    settings = settings_for(tmp_path / "data")

    async def scenario() -> None:
        db, _blobs, scheduler = await open_server(settings)
        died = asyncio.Event()
        die_at(scheduler, point, died)
        batch_id = await add_batch(scheduler, lines_with_errors())
        await asyncio.wait_for(died.wait(), 20)
        at_death = await db.get_batch(batch_id)
        assert at_death is not None
        assert at_death.status == ("completed" if point == "before-cleanup" else "finalizing")
        await abandon(db, scheduler)
        await check_recovered(settings, batch_id, "completed", exactly_once=True)

    asyncio.run(scenario())


@pytest.mark.parametrize("point", ["before-first-rename", "between-renames", "before-commit"])
def test_death_while_cancelling(tmp_path: Path, point: str) -> None:
    settings = settings_for(tmp_path / "data", delay=0.02)

    async def scenario() -> None:
        db, _blobs, scheduler = await open_server(settings)
        died = asyncio.Event()
        die_at(scheduler, point, died)
        batch_id = await add_batch(scheduler, lines_with_errors())
        batch = await wait_status(db, batch_id, ("in_progress",))
        while batch.completed + batch.failed < 10:
            await asyncio.sleep(0.02)
            batch = await db.get_batch(batch_id) or batch
        await scheduler.cancel(batch_id)  # what the cancel route does
        await asyncio.wait_for(died.wait(), 20)
        at_death = await db.get_batch(batch_id)
        assert at_death is not None and at_death.status == "cancelling"
        await abandon(db, scheduler)
        await check_recovered(settings, batch_id, "cancelled", exactly_once=False)

    asyncio.run(scenario())


@pytest.mark.parametrize("where", ["checkpoint-commit", "result-file", "finalizing"])
def test_injected_disk_full_pauses_then_resumes(tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC injected where a batch writes (no root or small disk needed): the batch pauses instead of
    failing, and completes exactly once when the writes succeed again."""
    monkeypatch.setattr(scheduler_module, "RESOURCE_RETRY_SECONDS", 0.3)
    settings = settings_for(tmp_path / "data", delay=0.005)

    async def scenario() -> None:
        db, blobs, scheduler = await open_server(settings)
        failures = {"left": 2}

        def full() -> bool:
            if failures["left"] > 0:
                failures["left"] -= 1
                return True
            return False

        if where == "checkpoint-commit":
            real_commit = CheckpointCommitter.commit

            def commit(*args: Any) -> None:  # runs on the result log's syncer thread
                if full():
                    raise sqlite3.OperationalError("database or disk is full")
                real_commit(*args)

            monkeypatch.setattr(CheckpointCommitter, "commit", commit)
        elif where == "result-file":
            real_open = blobs.open_parts

            def open_parts(*args: Any) -> Any:
                out, err = real_open(*args)
                if full():
                    out.close()
                    raise OSError(errno.ENOSPC, "No space left on device")
                return out, err

            blobs.open_parts = open_parts  # type: ignore[method-assign]
        else:
            real_promote = blobs.promote_part

            def promote(*args: Any) -> int:
                if full():
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_promote(*args)

            blobs.promote_part = promote  # type: ignore[method-assign]
        try:
            batch_id = await add_batch(scheduler, lines_with_errors())
            batch = await wait_status(db, batch_id, ("completed", "failed"), timeout=30)
            assert batch.status == "completed", batch.errors
            assert failures["left"] == 0
        finally:
            await scheduler.stop()
            await db.close()
        await check_recovered(settings, batch_id, "completed", exactly_once=True)

    with caplog.at_level("ERROR"):
        asyncio.run(scenario())
    assert "paused: out of disk space" in caplog.text


def test_a_transient_checkpoint_failure_is_retried_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A commit refused once (another process held the database past busy_timeout) must not cost the batch:
    the next checkpoint commits everything since the last good one."""
    settings = settings_for(tmp_path / "data", delay=0.005)

    async def scenario() -> None:
        db, _blobs, scheduler = await open_server(settings)
        real_commit = CheckpointCommitter.commit
        refused = {"left": 1}

        def commit(*args: Any) -> None:  # runs on the result log's syncer thread
            if refused["left"]:
                refused["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            real_commit(*args)

        monkeypatch.setattr(CheckpointCommitter, "commit", commit)
        try:
            batch_id = await add_batch(scheduler, lines_with_errors())
            batch = await wait_status(db, batch_id, ("completed", "failed"), timeout=30)
            assert batch.status == "completed", batch.errors
            assert refused["left"] == 0
        finally:
            await scheduler.stop()
            await db.close()
        await check_recovered(settings, batch_id, "completed", exactly_once=True)

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert "database is locked" in caplog.text


def test_a_wake_up_racing_a_shutdown_does_not_hang_the_scheduler() -> None:
    """The scheduler's loops sleep until an event or a timeout. If a stop's cancel lands just as the event
    fires, the loop must still end: with asyncio.wait_for (Python < 3.12) the cancel was swallowed and a
    graceful shutdown hung forever (found by test_injected_disk_full_pauses_then_resumes under load)."""

    async def scenario() -> None:
        event = asyncio.Event()

        async def loop() -> None:
            while True:
                await wait_event(event, 10)
                event.clear()

        for _ in range(20):
            task = asyncio.create_task(loop())
            await asyncio.sleep(0.01)  # the loop is waiting
            event.set()
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert task in done and task.cancelled(), "the cancel was swallowed: the loop runs on"

    asyncio.run(scenario())
