"""The lifecycle: one table of legal transitions, enforced even against code that bypasses the module, and an
event committed with every status change, read by consumers from their own durable cursors."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, chat_lines, sdk, submit, wait_for
from vllm_batch_server.statuses import ACTIVE, EVENT_TYPES, TERMINAL, TRANSITIONS, BatchStatus, predecessors
from vllm_batch_server.store.database import BatchRow, BatchWrites, Database
from vllm_batch_server.store.events import EventLog
from vllm_batch_server.store.lifecycle import Lifecycle

S = BatchStatus


@asynccontextmanager
async def opened(tmp_path: Path) -> AsyncIterator[tuple[Database, Lifecycle, EventLog]]:
    db = await Database.open(tmp_path / "db.sqlite3")
    lifecycle = Lifecycle(db)
    try:
        yield db, lifecycle, EventLog(db, lifecycle)
    finally:
        await db.close()


def new_batch(batch_id: str) -> BatchRow:
    return BatchRow(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-x",
                    completion_window="24h", status=S.VALIDATING, created_at=int(time.time()))


async def walk_to(lifecycle: Lifecycle, batch_id: str, status: BatchStatus) -> None:
    """Create a batch and move it along legal transitions until it is in `status`."""
    await lifecycle.create(new_batch(batch_id))
    path = {S.VALIDATING: [], S.IN_PROGRESS: [S.IN_PROGRESS], S.FINALIZING: [S.IN_PROGRESS, S.FINALIZING],
            S.COMPLETED: [S.IN_PROGRESS, S.FINALIZING, S.COMPLETED], S.FAILED: [S.FAILED],
            S.EXPIRED: [S.EXPIRED], S.CANCELLING: [S.CANCELLING], S.CANCELLED: [S.CANCELLING, S.CANCELLED]}
    for step in path[status]:
        assert await lifecycle.move(batch_id, step)


def test_the_transition_table_is_sound() -> None:
    assert set(BatchStatus) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL
    assert {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED} == TERMINAL
    for source, targets in TRANSITIONS.items():
        assert source not in targets
    # Every status is reachable from validating, and every active one can end.
    reached, frontier = {S.VALIDATING}, [S.VALIDATING]
    while frontier:
        for target in TRANSITIONS.get(frontier.pop(), ()):
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(BatchStatus)
    assert set(predecessors(S.CANCELLED)) == {S.CANCELLING}
    assert len(EVENT_TYPES) == len(set(EVENT_TYPES)) == len(BatchStatus)


@pytest.mark.parametrize("source", list(BatchStatus))
@pytest.mark.parametrize("target", list(BatchStatus))
def test_every_move_is_allowed_exactly_when_the_table_says(tmp_path: Path, source: BatchStatus,
                                                           target: BatchStatus) -> None:
    async def scenario() -> None:
        async with opened(tmp_path) as (db, lifecycle, events):
            await walk_to(lifecycle, "batch_a", source)
            before = await events.last_seq()
            legal = target in TRANSITIONS.get(source, ())
            if target is S.VALIDATING:  # nothing moves back to validating: a batch starts there
                with pytest.raises(ValueError, match="no batch may move"):
                    await lifecycle.move("batch_a", target)
            else:
                assert await lifecycle.move("batch_a", target) is legal
            row = await db.get_batch("batch_a")
            assert row is not None and row.status is (target if legal else source)
            assert await events.last_seq() == before + (1 if legal else 0)

    asyncio.run(scenario())


def test_illegal_moves_are_refused_even_bypassing_the_lifecycle(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with opened(tmp_path) as (db, lifecycle, _):
            await walk_to(lifecycle, "batch_a", S.COMPLETED)
            # The database has no writer of batch rows of its own: only the lifecycle's transactions.
            assert not hasattr(db, "update_batch")
        with sqlite3.connect(tmp_path / "db.sqlite3") as conn, pytest.raises(sqlite3.IntegrityError,
                                                                             match="illegal batch status"):
            conn.execute("UPDATE batches SET status = 'in_progress' WHERE id = 'batch_a'")

    asyncio.run(scenario())


def test_a_status_change_and_its_event_commit_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with opened(tmp_path) as (db, lifecycle, events):
            await walk_to(lifecycle, "batch_a", S.IN_PROGRESS)
            before = await events.last_seq()

            async def broken(*args: object) -> int:
                raise sqlite3.OperationalError("disk I/O error")

            monkeypatch.setattr(BatchWrites, "insert_event", broken)
            with pytest.raises(sqlite3.OperationalError):
                await lifecycle.move("batch_a", S.CANCELLING)
            row = await db.get_batch("batch_a")
            assert row is not None and row.status is S.IN_PROGRESS and row.cancelling_at is None
            assert await events.last_seq() == before

    asyncio.run(scenario())


def test_a_batch_that_is_ending_cannot_be_cancelled(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with opened(tmp_path) as (_, lifecycle, _):
            await walk_to(lifecycle, "batch_a", S.IN_PROGRESS)
            await lifecycle.set_outcome("batch_a", S.EXPIRED)  # finalizing has chosen how it ends
            assert not await lifecycle.move("batch_a", S.CANCELLING)
            assert await lifecycle.move("batch_a", S.EXPIRED)

    asyncio.run(scenario())


def test_a_reader_resumes_from_its_cursor_and_gets_unacknowledged_events_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with opened(tmp_path) as (_, lifecycle, events):
            await walk_to(lifecycle, "batch_a", S.COMPLETED)  # 4 events
            late = events.reader("late", start="end")
            assert await late.next(timeout=0) == []
            reader = events.reader("consumer", start="beginning")
            got = await reader.next(timeout=0)
            assert [e.type for e in got] == ["batch.created", "batch.in_progress", "batch.finalizing",
                                             "batch.completed"]
            assert got[1].previous is S.VALIDATING and all(e.batch_id == "batch_a" for e in got)
            await reader.ack(got[1])
        # "A crash": a new process, a new reader with the same name, resumes after the last ack.
        async with opened(tmp_path) as (_, lifecycle, events):
            reader = events.reader("consumer", start="beginning")
            assert [e.type for e in await reader.next(timeout=0)] == ["batch.finalizing", "batch.completed"]
            late = events.reader("late", start="end")
            assert await late.next(timeout=0) == []
            await lifecycle.create(new_batch("batch_b"))
            assert [e.type for e in await late.next(timeout=0)] == ["batch.created"]

    asyncio.run(scenario())


def test_a_waiting_reader_wakes_as_soon_as_an_event_is_appended(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with opened(tmp_path) as (_, lifecycle, events):
            reader = events.reader("waiter", start="end")
            await reader.position()
            waiting = asyncio.create_task(reader.next(timeout=30))
            await asyncio.sleep(0.05)
            began = time.monotonic()
            await lifecycle.create(new_batch("batch_a"))
            got = await asyncio.wait_for(waiting, 5)
            assert [e.type for e in got] == ["batch.created"] and time.monotonic() - began < 1

    asyncio.run(scenario())


def test_a_real_batch_leaves_its_whole_story_in_the_event_log(server_factory: ServerFactory) -> None:
    server = server_factory()
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(5)).id)
    cancelled = submit(client, chat_lines(5), completion_window="24h")
    client.batches.cancel(cancelled.id)
    wait_for(client, cancelled.id)
    server.kill()
    with sqlite3.connect(server.data_dir / "vllm-batch.sqlite3") as conn:
        def story(batch_id: str) -> list[tuple[str, str | None]]:
            return conn.execute("SELECT type, previous FROM events WHERE batch_id = ? ORDER BY seq",
                                (batch_id,)).fetchall()

        assert story(done.id) == [("batch.created", None), ("batch.in_progress", "validating"),
                                  ("batch.finalizing", "in_progress"), ("batch.completed", "finalizing")]
        types = [t for t, _ in story(cancelled.id)]
        assert types[0] == "batch.created" and types[-2:] == ["batch.cancelling", "batch.cancelled"]
