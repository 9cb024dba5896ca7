"""The durability contract at the unit level: what a checkpoint commits, and what a restart keeps."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.disk import fill, mounted_small_disk
from vllm_batch_server.engines.base import Result, Usage
from vllm_batch_server.queue import checkpoint
from vllm_batch_server.queue.checkpoint import ResultLog
from vllm_batch_server.settings import Settings
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow, Checkpoint, CheckpointCommitter, Database
from vllm_batch_server.store.lifecycle import Lifecycle


def _ok(n: int) -> Result:
    return Result(200, {"n": n}, Usage(input_tokens=2, cached_tokens=1, output_tokens=3))


async def _setup(tmp_path: Path, every: int = 1000,
                 seconds: float = 3600) -> tuple[Database, Blobs, Settings, BatchRow]:
    settings = Settings(data_dir=tmp_path, engine="echo", models=["m"], checkpoint_every=every,
                        checkpoint_seconds=seconds)
    blobs = Blobs(tmp_path)
    blobs.prepare()
    db = await Database.open(settings.db_path)
    batch = await Lifecycle(db).create(BatchRow(id="batch_test", endpoint="/v1/chat/completions",
                                                input_file_id="file-x", completion_window="24h",
                                                status=BatchStatus.VALIDATING, created_at=0, total=10))
    return db, blobs, settings, batch


def test_only_checkpointed_results_survive_and_the_torn_tail_is_cut(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, blobs, settings, batch = await _setup(tmp_path)
        log = ResultLog(Lifecycle(db), blobs, settings, batch)
        for i in range(3):
            log.append(f"ok-{i}", _ok(i))
        log.append("bad-0", Result.error(400, "too long", param="messages"))
        await log.checkpoint()
        log.append("ok-3", _ok(3))  # appended, flushed even, but never committed
        log.out.flush()
        await log.close()
        out_part, _ = blobs.part_paths(batch.id)
        with open(out_part, "ab") as fh:
            fh.write(b'{"custom_id": "torn')  # a crash in the middle of a write

        row = await db.get_batch(batch.id)
        assert row is not None
        assert (row.completed, row.failed) == (3, 1)
        assert (row.input_tokens, row.cached_tokens, row.output_tokens) == (6, 3, 9)
        assert list(ResultLog.committed_ids(blobs, row)) == ["ok-0", "ok-1", "ok-2", "bad-0"]

        resumed = ResultLog(Lifecycle(db), blobs, settings, row)  # opening cuts the parts back
        assert out_part.stat().st_size == row.output_offset
        resumed.append("ok-3", _ok(3))
        await resumed.checkpoint(final=True)
        await resumed.close()
        lines = [json.loads(line) for line in out_part.read_text().splitlines()]
        assert [line["custom_id"] for line in lines] == ["ok-0", "ok-1", "ok-2", "ok-3"]
        await db.close()

    asyncio.run(scenario())


def test_a_part_shorter_than_its_committed_offset_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, blobs, settings, batch = await _setup(tmp_path)
        log = ResultLog(Lifecycle(db), blobs, settings, batch)
        log.append("ok-0", _ok(0))
        await log.checkpoint()
        await log.close()
        out_part, _ = blobs.part_paths(batch.id)
        out_part.write_bytes(b"")  # the disk lost committed data
        row = await db.get_batch(batch.id)
        assert row is not None
        try:
            ResultLog(Lifecycle(db), blobs, settings, row)
        except OSError as exc:
            assert "shorter than its committed" in str(exc)
        else:
            raise AssertionError("silently zero-filled lost results")
        await db.close()

    asyncio.run(scenario())


@asynccontextmanager
async def open_log(tmp_path: Path, every: int = 1000,
                   seconds: float = 3600) -> AsyncIterator[tuple[ResultLog, Database, BatchRow]]:
    """A result log on a fresh db, both closed at the end even when the test fails (aiosqlite's thread
    would otherwise keep the interpreter from exiting)."""
    db, blobs, settings, batch = await _setup(tmp_path, every, seconds)
    log = ResultLog(Lifecycle(db), blobs, settings, batch)
    try:
        yield log, db, batch
    finally:
        await log.close()
        await db.close()


def _committed(db: Database, batch_id: str) -> tuple[int, int]:
    """(completed, output_offset) as another process would read them now, bypassing the event loop."""
    with sqlite3.connect(db.path) as conn:
        row = conn.execute("SELECT completed, output_offset FROM batches WHERE id = ?", (batch_id,)).fetchone()
    return row[0], row[1]


class GatedCommits:
    """CheckpointCommitter.commit held at a gate (a disk that stalls), counting what gets committed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.committed: list[int] = []
        real = CheckpointCommitter.commit

        def commit(committer: CheckpointCommitter, batch_id: str, point: Checkpoint) -> None:
            assert self.gate.wait(10), "the test never opened the gate"
            real(committer, batch_id, point)
            self.committed.append(point.results)

        monkeypatch.setattr(CheckpointCommitter, "commit", commit)


def test_a_checkpoint_commits_while_the_event_loop_is_busy(tmp_path: Path) -> None:
    """The syncer thread needs nothing from the loop: with a loop that never yields (an engine answering at
    once), results still become durable."""
    async def scenario() -> None:
        async with open_log(tmp_path) as (log, db, batch):
            for i in range(5):
                log.append(f"ok-{i}", _ok(i))
            log.snapshot()
            deadline = time.monotonic() + 10
            while _committed(db, batch.id)[0] != 5:  # the loop is blocked here: no await until it commits
                assert time.monotonic() < deadline, "the checkpoint never committed without the event loop"
                time.sleep(0.005)  # noqa: ASYNC251 - blocking the loop is the point
            assert _committed(db, batch.id)[1] == Path(log.out.name).stat().st_size

    asyncio.run(scenario())


def test_a_stalled_disk_holds_the_runner_back_after_checkpoint_seconds(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    commits = GatedCommits(monkeypatch)

    async def scenario() -> None:
        async with open_log(tmp_path, every=2, seconds=0.3) as (log, db, batch):
            for i in range(4):
                log.append(f"ok-{i}", _ok(i))
            log.snapshot()
            assert not log.behind()  # a commit under way is not yet a stall
            await asyncio.sleep(0.4)
            assert log.behind()  # waited longer than checkpoint_seconds: the runner must wait
            waiter = asyncio.ensure_future(log.wait_caught_up())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            commits.gate.set()
            await asyncio.wait_for(waiter, 10)
            assert not log.behind()
            assert log.committed.results == 4 and _committed(db, batch.id)[0] == 4

    asyncio.run(scenario())


def test_snapshots_taken_during_a_slow_commit_fold_into_one(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    commits = GatedCommits(monkeypatch)

    async def scenario() -> None:
        async with open_log(tmp_path) as (log, _store, _batch):
            for i in range(6):
                log.append(f"ok-{i}", _ok(i))
                log.snapshot()
                await asyncio.sleep(0.02)  # the syncer has taken the first and waits at the gate
            commits.gate.set()
            await asyncio.wait_for(log.wait_caught_up(), 10)
            # The first snapshot was under way; the five taken meanwhile became one commit, of the newest.
            assert commits.committed == [1, 6]

    asyncio.run(scenario())


def test_snapshots_are_spaced_out_at_high_result_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`checkpoint_every` results come faster than MIN_GAP_SECONDS apart: no more than one snapshot per gap."""
    monkeypatch.setattr(checkpoint, "MIN_GAP_SECONDS", 0.5)

    async def scenario() -> None:
        async with open_log(tmp_path, every=10) as (log, db, batch):
            began = time.monotonic()
            for i in range(100):
                log.append(f"ok-{i}", _ok(i))
            assert time.monotonic() - began < 0.5, "the machine was too slow to test this"
            assert log.pending == 100  # ten intervals' worth, and no snapshot yet
            await asyncio.sleep(0.5)
            log.append("ok-100", _ok(100))  # the gap has passed: this one takes the snapshot
            assert log.pending == 0
            await log.checkpoint()
            assert _committed(db, batch.id)[0] == 101

    asyncio.run(scenario())


def test_a_failed_fsync_stops_the_batch_and_commits_nothing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fsync the page cache cannot be trusted, so the offsets must not be committed."""
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        async with open_log(tmp_path) as (log, db, batch):
            monkeypatch.setattr(checkpoint.os, "fsync", fsync)
            log.append("ok-0", _ok(0))
            with pytest.raises(OSError, match="No space"):
                await asyncio.wait_for(log.checkpoint(), 10)
            with pytest.raises(OSError, match="No space"):
                log.raise_if_broken()
            assert _committed(db, batch.id) == (0, 0)

    asyncio.run(scenario())


def test_close_commits_a_snapshot_it_was_handed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_log(tmp_path) as (log, db, batch):
            for i in range(3):
                log.append(f"ok-{i}", _ok(i))
            log.snapshot()
            await log.close()  # no wait in between (closing again on the way out is harmless)
            assert _committed(db, batch.id)[0] == 3

    asyncio.run(scenario())


def test_reads_and_writes_stay_correct_while_checkpoints_commit_from_another_connection(tmp_path: Path) -> None:
    """Regression: a read left open across an await held a snapshot; the next write on the db's connection
    after a checkpoint commit failed at once with "database is locked" (seen as a 500 on POST /v1/batches)."""
    async def scenario() -> None:
        db, _, _, batch = await _setup(tmp_path)
        stop = threading.Event()
        errors: list[BaseException] = []

        def commit_in_a_loop() -> None:
            committer = Lifecycle(db).checkpoint_committer()
            n = 0
            try:
                while not stop.is_set():
                    n += 1
                    committer.commit(batch.id, Checkpoint(n, 0, n, 0, 0, 0, 0))
                    time.sleep(0.001)  # fifty times the rate of a runner's checkpoints, yet leaves room to write
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)
            finally:
                committer.close()

        thread = threading.Thread(target=commit_in_a_loop)
        thread.start()
        try:
            for round_ in range(150):
                reads: list[Any] = [db.get_batch(batch.id) for _ in range(3)]
                await asyncio.gather(*reads, Lifecycle(db).record_errors(batch.id, [{"round": round_}]),
                                     db.list_batches(after_seq=None, limit=5))
            assert errors == []
            row = await db.get_batch(batch.id)
            assert row is not None and row.errors == [{"round": 149}] and row.completed > 0
        finally:
            stop.set()
            thread.join()
            await db.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("custom_id", ["plain-1", 'quote"and\\backslash', "ünïcödé-✓", "x" * 2000, "a,b:c}{"])
def test_recovery_reads_back_any_custom_id(tmp_path: Path, custom_id: str) -> None:
    """Resuming reads the committed ids without parsing whole lines: every id must come back as written."""
    async def scenario() -> None:
        async with open_log(tmp_path) as (log, db, batch):
            log.append(custom_id, Result(200, {"text": '"custom_id": "not this one"' * 50}, Usage()))
            log.append(f"{custom_id}-2", _ok(2))
            await log.checkpoint()
            row = await db.get_batch(batch.id)
            assert row is not None
            assert list(ResultLog.committed_ids(Blobs(tmp_path), row)) == [custom_id, f"{custom_id}-2"]

    asyncio.run(scenario())


def test_lines_pending_when_the_disk_filled_never_reach_the_part_later(tmp_path: Path) -> None:
    """Regression: when a snapshot's flush hit a full disk, the result log's buffered file objects kept the
    unwritten lines, and one of them (the error part, never closed because closing the output part raised)
    wrote them when it was garbage-collected: after the resumed run had cut the part back, so the error file
    ended up with lines twice and more lines than request_counts.failed."""
    with mounted_small_disk(tmp_path / "disk") as disk:
        async def scenario() -> None:
            settings = Settings(data_dir=disk, engine="echo", models=["m"], checkpoint_every=10**6,
                                checkpoint_seconds=3600)
            blobs = Blobs(disk)
            blobs.prepare()
            db = await Database.open(tmp_path / "db.sqlite3")  # the database stays where there is room
            try:
                batch = await Lifecycle(db).create(BatchRow(
                    id="batch_test", endpoint="/v1/chat/completions", input_file_id="file-x",
                    completion_window="24h", status=BatchStatus.VALIDATING, created_at=0, total=20))
                first = ResultLog(Lifecycle(db), blobs, settings, batch)
                first.append("ok-0", Result(200, {"text": ""}))
                first.append_error("bad-0", "e", "refused")
                await first.checkpoint()
                # A second line that leaves the output part 10 bytes short of a 4 KiB page, the disk's unit.
                one = first.out.tell()
                first.append("ok-1", Result(200, {"text": "x" * (4096 - 10 - 2 * one)}))
                await first.checkpoint()
                assert first.out.tell() == 4096 - 10
                # Pending, not yet flushed: a line the output part has no room for once the disk is full
                # (so its flush fails), and two the error part's last page still holds.
                first.append("ok-2", Result(200, {"text": "x" * 500}))
                first.append_error("bad-1", "e", "refused")
                first.append_error("bad-2", "e", "refused")
                filler = fill(disk)
                with contextlib.suppress(OSError):
                    first.snapshot()
                with contextlib.suppress(OSError):
                    await first.close()
                filler.unlink()

                row = await db.get_batch(batch.id)
                assert row is not None and (row.completed, row.failed) == (2, 1)
                resumed = ResultLog(Lifecycle(db), blobs, settings, row)  # cuts both parts back to the commit
                del first
                gc.collect()  # whatever the first log still held would be written now
                resumed.append_error("bad-9", "e", "refused")
                await resumed.checkpoint()
                await resumed.close()
                _, err_part = blobs.part_paths(batch.id)
                lines = err_part.read_bytes().splitlines()
                assert [json.loads(line)["custom_id"] for line in lines] == ["bad-0", "bad-9"]
                final = await db.get_batch(batch.id)
                assert final is not None and final.failed == len(lines)
            finally:
                await db.close()

        asyncio.run(scenario())
