"""The durability contract, in one place (docs/reliability.md says what it promises).

A result is either committed (inside the output or error part, below the byte offset SQLite records) or not
produced yet. Results are appended in any order. A checkpoint is a snapshot of both parts' sizes and the
counters, taken on the event loop right after a flush; a syncer thread then fsyncs the parts and only then
commits the snapshot in one statement. On resume the parts are cut back to the committed offsets and the
committed `custom_id`s are read back and matched to their input lines (`custom_ids.lines_done`), so exactly the
requests without a committed result run again.

Why a thread of its own: with an engine that answers at once, the event loop is busy for up to 20 ms at a
time, and a checkpoint that had to come back to the loop between its fsync and its commit took several times
longer than the disk needed, while the results it had not yet committed piled up. The syncer needs the loop
for nothing: it takes the newest snapshot, makes it durable, takes the next. Snapshots handed over while it
works are folded into the newest one (group commit). The runner waits for it only when the disk falls more
than `checkpoint_seconds` behind, so what a crash recomputes stays bounded in time however slow the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from vllm_batch_server import ids
from vllm_batch_server.engines.base import Result
from vllm_batch_server.exhaustion import is_disk_full
from vllm_batch_server.settings import Settings
from vllm_batch_server.store import jsonl
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow, Checkpoint, CheckpointCommitter
from vllm_batch_server.store.lifecycle import Lifecycle

log = logging.getLogger(__name__)

# The shortest time between two snapshots. Each one costs the event loop a little (the flush, and the GIL
# handed to the syncer and back a few times): measured on the echo engine at ~30,000 results/s, a snapshot
# every 500 results (60 a second) cost 8-15% of the throughput, while 20 a second cost nothing measurable. At
# such rates an interval is therefore 50 ms of work rather than `checkpoint_every` results.
MIN_GAP_SECONDS = 0.05

# Backoff between attempts to commit a checkpoint SQLite refused (say the database stayed locked).
RETRY_SECONDS = (0.05, 0.2, 1.0)


# An engine's answer as a result line. Here, where results are written, and not in store/jsonl.py: the store
# knows no engine (jsonl.py keeps the line's other half, `custom_id_of`, and the error line).
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def result_line(custom_id: str, result: Result) -> bytes:
    """An engine's answer as an OpenAI batch output (or, for a non-200, error-file) line."""
    # "custom_id" right after "id": jsonl.custom_id_of() relies on finding it near the start.
    if result.raw is not None:  # the same line, with the body as the engine serialized it
        head = (f'{{"id":{_dumps(ids.new_request_id())},"custom_id":{_dumps(custom_id)},"response":'
                f'{{"status_code":{int(result.status_code)},"request_id":{_dumps(ids.new_request_id())},"body":')
        return b"".join((head.encode(), result.raw, b'},"error":null}\n'))
    response = {"status_code": result.status_code, "request_id": ids.new_request_id(), "body": result.body}
    line = {"id": ids.new_request_id(), "custom_id": custom_id, "response": response, "error": None}
    return _dumps(line).encode() + b"\n"


class ResultLog:
    """Appends one batch's results to its two parts; checkpoints make them durable.

    A snapshot is taken by the append that completes an interval: `checkpoint_every` results, but at least
    MIN_GAP_SECONDS and at most `checkpoint_seconds` after the last one (the runner's clock takes it when no
    result comes). A crash loses what was appended since the last commit: on average about one interval, at
    worst two plus what finished during one commit. Back-pressure: once a snapshot has waited longer than
    `checkpoint_seconds` for its commit, `behind()` tells the runner to `wait_caught_up()`.
    """

    def __init__(self, lifecycle: Lifecycle, blobs: Blobs, settings: Settings, batch: BatchRow,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self._every = max(1, settings.checkpoint_every)
        self._seconds = settings.checkpoint_seconds
        self._durable = settings.checkpointing
        self.out, self.err = blobs.open_parts(batch.id, batch.output_offset, batch.error_offset)
        self.completed = batch.completed
        self.failed = batch.failed
        self.input_tokens = batch.input_tokens
        self.cached_tokens = batch.cached_tokens
        self.output_tokens = batch.output_tokens
        self.pending = 0  # results appended since the last snapshot
        self._last = time.monotonic()  # when the last snapshot was taken
        self._first_pending: float | None = None  # when the oldest result not yet in a snapshot was appended
        self._submitted = self._point()  # the last snapshot handed to the syncer
        # Snapshots not known committed: (results, taken at, when its oldest result was appended).
        self._waiting: deque[tuple[int, float, float]] = deque()
        self._syncer = _Syncer(batch.id, self.out, self.err, lifecycle.checkpoint_committer(), self._submitted,
                              on_commit)

    @staticmethod
    def committed_ids(blobs: Blobs, batch: BatchRow) -> Iterator[str]:
        """custom_ids already committed for this batch, streamed from its parts (blocking: iterate it in a
        thread for big batches; `custom_ids.lines_done` turns them into input lines)."""
        out_part, err_part = blobs.part_paths(batch.id)
        yield from jsonl.iter_custom_ids(out_part, batch.output_offset)
        yield from jsonl.iter_custom_ids(err_part, batch.error_offset)

    def append(self, custom_id: str, result: Result) -> None:
        usage = result.usage
        self.input_tokens += usage.input_tokens
        self.cached_tokens += usage.cached_tokens
        self.output_tokens += usage.output_tokens
        self._write(result.ok, result_line(custom_id, result))

    def append_error(self, custom_id: str, code: str, message: str) -> None:
        """A request that never reached the engine (e.g. `batch_expired`): OpenAI's top-level error."""
        self._write(False, jsonl.error_line(custom_id, code, message))

    def _write(self, ok: bool, data: bytes) -> None:
        if ok:
            self.out.write(data)
            self.completed += 1
        else:
            self.err.write(data)
            self.failed += 1
        if self._first_pending is None:
            self._first_pending = time.monotonic()
        self.pending += 1
        if self._durable:
            elapsed = time.monotonic() - self._last
            if elapsed >= self._seconds or (self.pending >= self._every and elapsed >= MIN_GAP_SECONDS):
                self.snapshot()

    def _point(self) -> Checkpoint:
        return Checkpoint(self.out.tell(), self.err.tell(), self.completed, self.failed, self.input_tokens,
                          self.cached_tokens, self.output_tokens)

    def snapshot(self) -> None:
        """Hand the syncer everything appended so far. Synchronous, so no result can slip in between the flush
        and the offsets it records."""
        self.out.flush()
        self.err.flush()
        self._submitted = self._point()
        self.pending = 0
        self._last = time.monotonic()
        self._waiting.append((self._submitted.results, self._last, self._first_pending or self._last))
        self._first_pending = None
        self._syncer.submit(self._submitted)

    @property
    def committed(self) -> Checkpoint:
        """The newest snapshot known to be durable."""
        return self._syncer.committed

    def due_by_time(self) -> bool:
        """Whether results have waited `checkpoint_seconds` for a snapshot: the runner's clock asks, for when
        no new result comes to take it."""
        return self._durable and self.pending > 0 and time.monotonic() - self._last >= self._seconds

    def behind(self) -> bool:
        """Whether a snapshot has waited more than `checkpoint_seconds` for its commit: the disk has fallen
        behind, and the runner should wait_caught_up() rather than pile up more work a crash would cost."""
        waiting = self._waiting
        if not waiting:  # the common case, first: this runs after every result
            return False
        committed = self._syncer.committed.results
        while waiting and waiting[0][0] <= committed:
            waiting.popleft()
        return bool(waiting) and time.monotonic() - waiting[0][1] > self._seconds

    def lag(self) -> tuple[float, int]:
        """(age in seconds of the oldest result not yet durable, how many results are not yet durable): what a
        kill -9 right now would cost. Read by the metrics on the event loop, like `behind`."""
        committed = self._syncer.committed.results
        waiting = self._waiting
        while waiting and waiting[0][0] <= committed:
            waiting.popleft()
        oldest = waiting[0][2] if waiting else self._first_pending
        uncommitted = self.completed + self.failed - committed
        if oldest is None or uncommitted <= 0:
            return 0.0, 0
        return time.monotonic() - oldest, uncommitted

    async def wait_caught_up(self) -> None:
        """Until the last snapshot is committed. Raises what stopped the syncer, if it stopped."""
        await self._syncer.wait_for(self._submitted)

    def raise_if_broken(self) -> None:
        if self._syncer.error is not None:
            raise self._syncer.error

    async def checkpoint(self, *, final: bool = False) -> None:
        """Snapshot what is pending and wait until it is committed. With checkpointing off, only `final` does."""
        if not (self._durable or final):
            return
        if self.pending:
            self.snapshot()
        await self.wait_caught_up()

    async def close(self) -> None:
        """Stop the syncer (it first commits a snapshot it was handed) and close the parts."""
        self._syncer.close()
        try:
            await asyncio.shield(asyncio.to_thread(self._syncer.join))
        finally:
            # Cancelled meanwhile: block instead. A run that resumes this batch must never race a committer
            # still writing this one's offsets.
            self._syncer.join()
            self.out.close()
            self.err.close()


def _unobserved(seconds: float) -> None:
    pass


class _Syncer:
    """The thread that makes snapshots durable: fsync the parts that grew, then commit, then the next one.

    `committed` and `error` are written by the thread and read on the event loop; waiters there are woken
    through `call_soon_threadsafe`. Snapshots handed over while it works replace one another: the newest covers
    everything before it, so one fsync and one commit serve them all.
    """

    def __init__(self, batch_id: str, out: Any, err: Any, committer: CheckpointCommitter,
                 committed: Checkpoint, on_commit: Callable[[float], None] | None = None) -> None:
        self.committed = committed
        # Told how long each commit took, on this thread (metrics listen; the durability path imports none).
        self._on_commit = on_commit or _unobserved
        self.error: BaseException | None = None  # why the thread stopped early (fsync failed, disk full)
        self._batch_id = batch_id
        self._committer = committer
        # Descriptors of its own: the loop may close its file objects while a commit is still under way.
        self._fds = (os.dup(out.fileno()), os.dup(err.fileno()))
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._cond = threading.Condition()
        self._next: Checkpoint | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{batch_id}", daemon=True)
        self._thread.start()

    def submit(self, point: Checkpoint) -> None:
        with self._cond:
            self._next = point
            self._cond.notify()

    async def wait_for(self, point: Checkpoint) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if self.committed.results >= point.results:
                return
            self._changed.clear()
            # Checked again after the clear: a commit landing in between has already posted its wake-up.
            if self.error is None and self.committed.results < point.results:
                await self._changed.wait()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        synced = (self.committed.output_offset, self.committed.error_offset)
        try:
            while True:
                with self._cond:
                    while self._next is None and not self._closing:
                        self._cond.wait()
                    point, self._next = self._next, None
                if point is None:  # closing, and nothing left to commit
                    return
                began = time.perf_counter()
                offsets = (point.output_offset, point.error_offset)
                for fd, offset, done in zip(self._fds, offsets, synced, strict=True):
                    if offset != done:  # most batches never write an error line; each fsync is a disk flush
                        os.fsync(fd)
                synced = offsets
                self._commit(point)
                self._on_commit(time.perf_counter() - began)
                self.committed = point
                self._wake()
        except Exception as exc:  # handed to the event loop: the runner raises it
            self.error = exc
            self._wake()
        finally:
            for fd in self._fds:
                os.close(fd)
            self._committer.close()

    def _commit(self, point: Checkpoint) -> None:
        attempt = 0
        while True:
            try:
                self._committer.commit(self._batch_id, point)
                return
            except sqlite3.Error as exc:
                if is_disk_full(exc) or (self._closing and attempt >= len(RETRY_SECONDS)):
                    raise
                # Refused (another process held the database past busy_timeout): the parts are fsynced, so
                # retrying loses nothing; meanwhile the back-pressure holds the runner.
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                log.warning("checkpoint of batch %s not committed, retrying in %gs: %s", self._batch_id, delay,
                            exc)
                attempt += 1
                time.sleep(delay)

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._changed.set)
