"""Runs one batch: stream its input into the engine through a bounded window of workers, log every result.

A fixed pool of `window` workers pulls the next request as soon as it has finished its last one, so the engine
always has `window` requests in flight and never waits at a chunk boundary for the slowest request of a chunk.
Only the input's read position, the current in-flight requests, one chunk of `--prefix-lookahead` requests
(reordered so that those sharing a long prompt prefix run together, see grouping.py) and one bit per input line
(which have a result) are in memory, whatever the batch's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any

from vllm_batch_server.engines.base import Engine, EngineError
from vllm_batch_server.exhaustion import exhausted
from vllm_batch_server.queue.checkpoint import ResultLog
from vllm_batch_server.queue.custom_ids import LineSet, lines_done
from vllm_batch_server.queue.grouping import group_by_prefix, prompt_reader
from vllm_batch_server.queue.online import BatchTurns
from vllm_batch_server.queue.priority import batch_priority
from vllm_batch_server.settings import Settings
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow
from vllm_batch_server.store.jsonl import iter_raw_lines, requests_in
from vllm_batch_server.store.lifecycle import Lifecycle

log = logging.getLogger(__name__)

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."

# The longest the workers keep the event loop to themselves when the engine answers without waiting.
YIELD_SECONDS = 0.02

# Why a runner stopped before its input ran out: the batch was cancelled or expired (it ends so), or the
# server is stopping or the engine hangs (it stays in_progress and resumes later).
CANCELLED, EXPIRED = BatchStatus.CANCELLED, BatchStatus.EXPIRED
SHUTDOWN = "shutdown"


class BatchRunner:
    def __init__(self, lifecycle: Lifecycle, blobs: Blobs, engine: Engine, settings: Settings,
                 batch: BatchRow, turns: BatchTurns | None = None,
                 on_checkpoint: Callable[[float], None] | None = None) -> None:
        self._on_checkpoint = on_checkpoint  # told each checkpoint's commit time (checkpoint.ResultLog)
        self.batch = batch
        self._turns = turns  # shared with online requests: narrowed while they are answered (online.py)
        self._lifecycle = lifecycle
        self._blobs = blobs
        self._engine = engine
        self._settings = settings
        self.window = max(1, settings.window or engine.capacity)
        self.input_exhausted = asyncio.Event()  # every request handed out: the next batch may overlap
        self.stop_reason: BatchStatus | str | None = None
        self.aborted = 0  # requests in flight when the runner stopped early: aborted, to be recomputed
        self.results: ResultLog | None = None  # while running: its checkpoint lag is a gauge (metrics.py)
        self._stopped = asyncio.Event()
        self._in_flight: dict[str, float] = {}  # engine request id -> start time
        self._engine_error: BaseException | None = None
        self._winding_down = False  # in-flight requests are being aborted: their answers are not results

    def stop(self, reason: BatchStatus | str) -> None:
        """Ask the runner to wind down: in-flight requests are aborted, finished results are kept."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stopped.set()

    async def run(self) -> BatchStatus | None:
        """How the batch should end: completed, cancelled or expired; None when it stopped for a shutdown and
        stays in_progress. Raises EngineError when the engine failed, or the error itself when one of our
        resources ran out (exhaustion.py): neither is the batch's fault."""
        input_path = self._blobs.file_path(self.batch.input_file_id)
        # The input lines with a committed result (after a restart), one bit each; lines get theirs as their
        # results are appended, for an expiry to know which have none.
        done = await asyncio.to_thread(lines_done, input_path, partial(ResultLog.committed_ids, self._blobs,
                                                                       self.batch), self._blobs.tmp_dir)
        results = self.results = ResultLog(self._lifecycle, self._blobs, self._settings, self.batch,
                                                  self._on_checkpoint)
        try:
            if self.stop_reason is None:
                pending = requests_in(line for line in iter_raw_lines(input_path) if line[0] not in done)
                grouped = group_by_prefix(pending, prompt_reader(itemgetter(2)), self._settings.prefix_lookahead)
                await self._feed(results, grouped, done)
            if self.stop_reason == EXPIRED:
                await self._expire_rest(results, input_path, done)
            if self._engine_error is None:
                await results.checkpoint(final=True)
            else:  # commit what finished, unless the failure is what stops commits (a full disk)
                with contextlib.suppress(Exception):
                    await results.checkpoint(final=True)
        finally:
            # Not input_exhausted: the scheduler must learn how this run ended before it starts another batch
            # on the same engine (an engine that just failed must be restarted first).
            await results.close()
            self.results = None
        error = self._engine_error
        if error is not None:
            if exhausted(error) is not None or isinstance(error, EngineError):
                raise error
            raise EngineError(str(error)) from error
        if self.stop_reason == SHUTDOWN:
            return None
        return self.stop_reason if isinstance(self.stop_reason, BatchStatus) else BatchStatus.COMPLETED

    async def _feed(self, results: ResultLog, requests: Iterator[tuple[int, str, dict[str, Any]]],
                    done: LineSet) -> None:
        batch_id, url = self.batch.id, self.batch.endpoint
        # Behind online requests, and behind batches due sooner (priority.py).
        priority = batch_priority(self.batch.completion_window)
        slice_end, slices = time.monotonic() + YIELD_SECONDS, 0

        def next_request() -> tuple[int, str, dict[str, Any]] | None:
            request = next(requests, None)
            if request is None:
                self.input_exhausted.set()
            return request

        async def worker() -> None:
            nonlocal slice_end, slices
            # Not past a wind-down: a cancel the engine swallowed (answering instead) must not start the next.
            while not self._winding_down and (item := next_request()) is not None:
                line_no, custom_id, body = item
                request_id = f"{batch_id}-{line_no}"
                if self._turns is not None:
                    await self._turns.take()
                self._in_flight[request_id] = time.monotonic()
                try:
                    result = await self._engine.run(request_id, url, body, priority=priority)
                finally:
                    del self._in_flight[request_id]
                    if self._turns is not None:
                        self._turns.give_back()
                if self._winding_down and not result.ok:
                    # We are aborting what is in flight (cancel, expiry, shutdown, an engine failure): an engine
                    # may answer an aborted request with an error of its own (vLLM: 400 "Client disconnected").
                    # That is our doing, not the request's result: it has no line (a cancel), gets
                    # batch_expired (an expiry) or runs again (a shutdown).
                    return
                results.append(custom_id, result)
                done.add(line_no)
                if results.behind():
                    # Two intervals wait for their commit: wait, so a crash never costs more however slowly
                    # the disk runs. (The syncer thread commits without the loop, so at any engine speed the
                    # disk, not this wait, sets the pace.)
                    await results.wait_caught_up()
                elif time.monotonic() >= slice_end:
                    # An engine that answers without suspending (echo at zero delay) would otherwise keep
                    # the loop to itself: no HTTP answers, no status.
                    seen = slices
                    await asyncio.sleep(0)
                    if slices == seen:  # the first worker back after the pause starts the next time slice
                        slices += 1
                        slice_end = time.monotonic() + YIELD_SECONDS

        workers = [asyncio.create_task(worker()) for _ in range(self.window)]
        checkpointer = asyncio.create_task(self._checkpoints(results))
        all_done: asyncio.Future[list[None]] = asyncio.gather(*workers)
        stopped: asyncio.Task[bool] = asyncio.create_task(self._stopped.wait())
        try:
            # The checkpointer too: if it dies (a full disk), running on without checkpoints would only pile
            # up work that cannot be committed.
            await asyncio.wait([all_done, stopped, checkpointer],  # type: ignore[type-var]
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._winding_down = True
            running = [task for task in workers if not task.done()]
            self.aborted = len(self._in_flight)
            if running:
                # Stopping (cancel, expiry, shutdown or an engine failure): abort what is in flight.
                with contextlib.suppress(Exception):
                    await self._engine.abort(list(self._in_flight))
                for task in running:
                    task.cancel()
            stopped.cancel()
            await asyncio.gather(all_done, return_exceptions=True)
            checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpointer
        error = next((t.exception() for t in workers if not t.cancelled() and t.exception()), None)
        if error is not None and self._engine_error is None:
            self._engine_error = error

    async def _checkpoints(self, results: ResultLog) -> None:
        """The clock: a snapshot when results waited `checkpoint_seconds`; a syncer that died (a full disk)
        stops the batch; a request running past `request_timeout` means the engine hangs."""
        period = max(0.05, min(self._settings.checkpoint_seconds, 1.0))
        while True:
            await asyncio.sleep(period)
            results.raise_if_broken()
            if results.due_by_time():
                results.snapshot()
            oldest = min(self._in_flight.values(), default=None)
            if oldest is not None and time.monotonic() - oldest > self._settings.request_timeout:
                self._engine_error = EngineError(
                    f"a request has been running for more than {self._settings.request_timeout:.0f}s; "
                    "the engine appears to hang")
                self.stop(SHUTDOWN)

    async def _expire_rest(self, results: ResultLog, input_path: Path, done: LineSet) -> None:
        """Every request without a result gets a `batch_expired` error line, as OpenAI does."""
        for line_no, custom_id, _ in requests_in(line for line in iter_raw_lines(input_path)
                                                  if line[0] not in done):
            results.append_error(custom_id, "batch_expired", EXPIRED_MESSAGE)
            done.add(line_no)
            if results.behind():
                await results.wait_caught_up()
