"""The batch queue: validates new batches, runs them FIFO on the engine, finalizes, cancels and expires them.

It owns the one engine and decides which model is loaded: a batch whose model differs from the loaded one
waits for the running batches to finish, then the engine switches. While a batch's last requests are still
in flight, the next batch of the same model may start, so the engine is never idle at a batch's tail.

All state lives in SQLite; the scheduler's memory is only which runners are live. A restart rebuilds
everything: batches that were running resume from their checkpoint, half-finalized ones finish finalizing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from vllm_batch_server import ids
from vllm_batch_server.engines.base import Engine, EngineError
from vllm_batch_server.runner import CANCELLED, EXPIRED, SHUTDOWN, BatchRunner
from vllm_batch_server.settings import Settings
from vllm_batch_server.storage import Storage, is_disk_full
from vllm_batch_server.store import ACTIVE_STATUSES, BatchRow, FileRow, Store
from vllm_batch_server.validate import validate_input

log = logging.getLogger(__name__)

# The column that records when a batch reached each terminal status.
_ENDED_AT = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at",
             "failed": "failed_at"}


# How long a batch that ran out of disk space waits before it tries again.
DISK_FULL_RETRY_SECONDS = 2.0


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` passes. Not asyncio.wait_for: before Python 3.12 it swallows a cancel
    that arrives just as the event fires, and the loop waiting here then never stops (a shutdown that hangs)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout)
    finally:
        waiter.cancel()


def now() -> int:
    return int(time.time())


class Scheduler:
    def __init__(self, store: Store, storage: Storage, engine: Engine, settings: Settings) -> None:
        self.store = store
        self.storage = storage
        self.engine = engine
        self.settings = settings
        self._runners: dict[str, BatchRunner] = {}
        self._drivers: set[asyncio.Task[None]] = set()
        self._queue_changed = asyncio.Event()
        self._new_batch = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._engine_lock = asyncio.Lock()
        self._finalizing: set[str] = set()
        self._paused_until: dict[str, float] = {}  # batch id -> monotonic time: out of disk space, wait

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._recover()
        for loop in (self._validate_loop, self._run_loop, self._sweep_loop):
            self._tasks.append(asyncio.create_task(loop(), name=loop.__name__))

    async def stop(self) -> None:
        """Graceful shutdown: running batches checkpoint and stay in_progress, to resume at next start."""
        for runner in self._runners.values():
            runner.stop(SHUTDOWN)
        if self._drivers:
            await asyncio.wait(self._drivers, timeout=30)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.engine.stop()

    def notify(self) -> None:
        """A batch was created: validate it soon."""
        self._new_batch.set()

    async def _recover(self) -> None:
        for batch in await self.store.batches_in(ACTIVE_STATUSES):
            if batch.status == "finalizing" or batch.outcome:
                await self._finalize(batch, batch.outcome or "completed")
            elif batch.status == "cancelling":
                await self._finalize(batch, CANCELLED)
        # Blobs that no row names: an upload or output that crashed between rename and commit.
        known = await self.store.all_file_ids()
        for batch in await self.store.batches_in(ACTIVE_STATUSES):
            known.update(i for i in (batch.output_file_id, batch.error_file_id) if i)
        for orphan in self.storage.stored_file_ids() - known:
            log.info("removing orphaned blob %s", orphan)
            self.storage.remove_file(orphan)
        # Result parts of batches that already ended: a crash between the final commit and the clean-up.
        active = {batch.id for batch in await self.store.batches_in(ACTIVE_STATUSES)}
        for directory in list(self.storage.batches_dir.iterdir()):
            if ids.is_batch_id(directory.name) and directory.name not in active:
                log.info("removing the leftover result parts of ended batch %s", directory.name)
                await asyncio.to_thread(self.storage.remove_batch_dir, directory.name)

    # ---- validation --------------------------------------------------------------------------------------

    async def _validate_loop(self) -> None:
        while True:
            self._new_batch.clear()  # before looking, so a batch created meanwhile wakes us again
            for batch in await self.store.batches_in(["validating"]):
                try:
                    await self._validate(batch)
                except Exception:
                    log.exception("could not validate batch %s", batch.id)
                    await self._fail(batch, "server_error", "The input file could not be validated.")
            await wait_event(self._new_batch, 5)

    async def _validate(self, batch: BatchRow) -> None:
        path = self.storage.file_path(batch.input_file_id)
        report = await asyncio.to_thread(
            validate_input, path, endpoint=batch.endpoint, served_models=self.settings.models,
            max_lines=self.settings.max_batch_lines, max_errors=self.settings.max_errors_reported)
        if report.ok:
            changed = await self.store.update_batch(
                batch.id, only_if_status=["validating"], status="in_progress", in_progress_at=now(),
                total=report.total, model=report.model)
        else:
            changed = await self.store.update_batch(
                batch.id, only_if_status=["validating"], status="failed", failed_at=now(),
                errors=[e.as_dict() for e in report.errors], total=report.total)
        if changed:
            self._queue_changed.set()  # either way, the batches queued behind it may go now

    # ---- running -----------------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            self._queue_changed.clear()  # before looking, so a change made meanwhile wakes us again
            batch = await self._next_batch()
            if batch is None:
                await wait_event(self._queue_changed, self.settings.sweep_seconds)
                continue
            if self.engine.model != batch.model:
                if self._drivers:
                    # Never switch models under a running batch. Then look again: a batch that ended in an
                    # engine failure is older than this one and must resume first.
                    await self._wait_runners()
                    continue
                if not await self._load(batch):
                    continue
            # Look again right before registering: a cancel or expiry may have ended it meanwhile. No await
            # separates this read from the registration, so the API's cancel either sees the runner or
            # finds the batch unclaimed and finalizes it itself.
            batch = await self.store.get_batch(batch.id)
            if batch is None or batch.status != "in_progress" or batch.id in self._runners:
                continue
            runner = BatchRunner(self.store, self.storage, self.engine, self.settings, batch)
            self._runners[batch.id] = runner
            driver = asyncio.create_task(self._drive(runner), name=f"run {batch.id}")
            self._drivers.add(driver)
            driver.add_done_callback(self._drivers.discard)
            # Start the next batch once this one has handed out all its requests (or ended).
            exhausted = asyncio.create_task(runner.input_exhausted.wait())
            await asyncio.wait([exhausted, driver], return_when=asyncio.FIRST_COMPLETED)
            exhausted.cancel()

    async def _next_batch(self) -> BatchRow | None:
        """The oldest batch ready to run. Strictly in creation order: while an older batch is still being
        validated, nothing newer starts (it would overtake it, and could force an extra model switch)."""
        for batch in await self.store.batches_in(["validating", "in_progress"]):
            # A batch with an outcome is being finalized; a paused one waits for disk space.
            if batch.id in self._runners or batch.outcome or batch.id in self._paused_until:
                continue
            return batch if batch.status == "in_progress" else None
        return None

    async def _wait_runners(self) -> None:
        while self._drivers:
            await asyncio.wait(set(self._drivers))

    async def _load(self, batch: BatchRow) -> bool:
        """Switch the engine to the batch's model; a model that cannot load fails the batch."""
        assert batch.model is not None
        async with self._engine_lock:
            try:
                await self.engine.stop()
                log.info("loading model %s", batch.model)
                await self.engine.start(batch.model)
                return True
            except Exception as exc:  # the model, not the server, is broken: fail this batch only
                log.exception("could not load model %s", batch.model)
                with contextlib.suppress(Exception):
                    await self.engine.stop()
                await self._fail(batch, "model_load_failed", f"The model {batch.model!r} could not be loaded: "
                                 f"{exc}")
                return False

    async def _drive(self, runner: BatchRunner) -> None:
        """Run a batch and end it. The runner stays registered until the batch is finalized, so neither the
        run loop nor the expiry sweep can start a second runner for it in between."""
        batch = runner.batch
        try:
            try:
                outcome = await runner.run()
            except EngineError as exc:
                await self._engine_failed(batch, exc)
                return
            if outcome == SHUTDOWN:
                return  # stays in_progress; resumes at next start
            current = await self.store.get_batch(batch.id)
            if current is None:
                return
            if current.status == "cancelling":
                outcome = CANCELLED
            await self._finalize(current, outcome)
        except Exception as exc:
            if is_disk_full(exc):
                self._pause_for_space(batch.id, exc)
                return
            log.exception("batch %s stopped on an unexpected error", batch.id)
            await self._fail(batch, "server_error", f"The batch stopped on an internal error: {exc}")
        finally:
            self._runners.pop(batch.id, None)
            self._queue_changed.set()

    async def _engine_failed(self, batch: BatchRow, exc: Exception) -> None:
        current = await self.store.get_batch(batch.id) or batch
        failures = current.engine_failures + 1
        log.error("engine failed on batch %s (%d/%d): %s", batch.id, failures,
                  self.settings.engine_max_restarts, exc)
        if current.status == "cancelling":
            await self._finalize(current, CANCELLED)
        elif failures > self.settings.engine_max_restarts:
            await self._fail(current, "engine_error", f"The engine failed {failures} times while running this "
                             f"batch; last error: {exc}. Results computed so far are kept.")
        else:
            await self.store.update_batch(batch.id, engine_failures=failures)
        async with self._engine_lock:
            with contextlib.suppress(Exception):
                await self.engine.stop()  # the run loop reloads it for whatever runs next

    def _pause_for_space(self, batch_id: str, exc: BaseException) -> None:
        """Out of disk space: failing the batch would drop accepted work, and nothing committed is lost (the
        parts are cut back to the last checkpoint on resume), so wait and try again."""
        log.error("batch %s paused: out of disk space (%s); retrying in %.0fs", batch_id, exc,
                  DISK_FULL_RETRY_SECONDS)
        self._paused_until[batch_id] = time.monotonic() + DISK_FULL_RETRY_SECONDS
        # With the scheduler's own loops, so a shutdown cancels it, and apart from the drivers, so a model
        # switch does not wait for the disk to be freed.
        task = asyncio.create_task(self._resume_after_pause(batch_id), name=f"resume {batch_id}")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _resume_after_pause(self, batch_id: str) -> None:
        await asyncio.sleep(DISK_FULL_RETRY_SECONDS)
        self._paused_until.pop(batch_id, None)
        batch = await self.store.get_batch(batch_id)
        if batch is not None and batch.id not in self._runners and (
                batch.outcome or batch.status in ("finalizing", "cancelling")):
            try:  # it was ending when the disk filled: finish that (idempotent)
                await self._finalize(batch, batch.outcome or CANCELLED)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self._pause_for_space(batch_id, exc)
        self._queue_changed.set()  # an in_progress batch is picked up again by the run loop

    # ---- ending ------------------------------------------------------------------------------------------

    async def cancel(self, batch: BatchRow) -> None:
        """Called after the API moved the batch to `cancelling`."""
        runner = self._runners.get(batch.id)
        if runner is not None:
            runner.stop(CANCELLED)
        else:
            await self._finalize(batch, CANCELLED)

    async def _fail(self, batch: BatchRow, code: str, message: str) -> None:
        errors = [{"code": code, "line": None, "message": message, "param": None}]
        await self.store.update_batch(batch.id, errors=errors)
        await self._finalize(batch, "failed")

    async def _finalize(self, batch: BatchRow, outcome: str) -> None:
        """Turn the committed result parts into registered files and end the batch. Idempotent: a crash
        anywhere in here is repaired by running it again at start-up."""
        if batch.id in self._finalizing:
            return
        self._finalizing.add(batch.id)
        try:
            await self._finalize_once(batch, outcome)
        finally:
            self._finalizing.discard(batch.id)

    async def _finalize_once(self, batch: BatchRow, outcome: str) -> None:
        batch = await self.store.get_batch(batch.id) or batch
        if batch.status not in ACTIVE_STATUSES:
            return
        if not batch.outcome:
            # Decide the file ids before any rename, so a crash mid-way can be finished with the same ids.
            changes: dict[str, Any] = {
                "outcome": outcome,
                "output_file_id": ids.new_file_id() if batch.output_offset > 0 else None,
                "error_file_id": ids.new_file_id() if batch.error_offset > 0 else None,
            }
            if outcome == "completed":
                changes.update(status="finalizing", finalizing_at=now())
            await self.store.update_batch(batch.id, **changes)
            batch = await self.store.get_batch(batch.id) or batch
        outcome = batch.outcome or outcome
        out_part, err_part = self.storage.part_paths(batch.id)
        ended = now()
        expires = ended + batch.output_expires_after if batch.output_expires_after else None
        files: list[FileRow] = []
        for file_id, part, offset, name in (
            (batch.output_file_id, out_part, batch.output_offset, "output"),
            (batch.error_file_id, err_part, batch.error_offset, "errors"),
        ):
            if file_id:
                size = await asyncio.to_thread(self.storage.promote_part, part, offset, file_id)
                files.append(FileRow(id=file_id, filename=f"{batch.id}_{name}.jsonl", purpose="batch_output",
                                     bytes=size, created_at=ended, expires_at=expires))
        await self.store.finish_batch(batch.id, files, status=outcome, **{_ENDED_AT[outcome]: ended})
        await asyncio.to_thread(self.storage.remove_batch_dir, batch.id)
        log.info("batch %s %s", batch.id, outcome)

    # ---- time-driven: expiry of batches and files --------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                await self._sweep()
            except Exception:
                log.exception("expiry sweep failed; retrying in %ss", self.settings.sweep_seconds)

    async def _sweep(self) -> None:
        moment = now()
        for batch in await self.store.batches_in(["validating", "in_progress"]):
            if batch.expires_at is None or batch.expires_at > moment:
                continue
            runner = self._runners.get(batch.id)
            if runner is not None:
                runner.stop(EXPIRED)
            elif batch.status == "validating" or batch.total == 0:
                await self._finalize(batch, EXPIRED)
            else:
                # Never started: every request gets its batch_expired line, through the same durable path.
                runner = BatchRunner(self.store, self.storage, self.engine, self.settings, batch)
                runner.stop(EXPIRED)
                self._runners[batch.id] = runner
                await self._drive(runner)
        for file in await self.store.expired_files(moment):
            if await self.store.file_in_use(file.id) is None:
                await self.store.delete_file(file.id)
                self.storage.remove_file(file.id)
