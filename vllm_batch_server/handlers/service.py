"""Running the result handlers: fed from the lifecycle's event log, durable per (batch, handler), at least once.

Two tasks of their own, apart from the scheduler:

- intake reads the event log from its own cursor (`result-handlers`). For each batch that ended it records
  a pending run of every handler configured for that ending in `handler_runs`, and only then acks the event.
  A crash in between reads the event again, and recording it again changes nothing.
- dispatch starts the runs that are due, at most `concurrency` (default 2) at once per handler, so a slow or
  stuck handler holds up neither the others nor the queue. An attempt is counted before the handler is called;
  a failure (an exception, or no answer within the handler's timeout) schedules the next attempt with a
  doubling back-off, until `max_attempts`, after which the run is `failed`. A run cut short by a crash or a
  stop is still pending, so it runs again after the restart: never zero times, sometimes twice.

Plain `handle` methods run on a thread pool per handler: the default pool is shared with the scheduler's disk
work (validation, finalizing), which a slow handler must never hold up.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vllm_batch_server.aio import wait_event
from vllm_batch_server.handlers import EndedBatch
from vllm_batch_server.handlers.loading import Handler
from vllm_batch_server.statuses import TERMINAL, event_type
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import Database
from vllm_batch_server.store.events import EventLog, EventReader
from vllm_batch_server.store.schemas import batch_object

log = logging.getLogger(__name__)

READER = "result-handlers"
ENDED = {event_type(status): status.value for status in TERMINAL}
IDLE_SECONDS = 30.0
ERROR_RETRY_SECONDS = 2.0
MAX_ERROR = 2000


class HandlerService:
    def __init__(self, db: Database, blobs: Blobs, events: EventLog, handlers: list[Handler]) -> None:
        self._db = db
        self._blobs = blobs
        self._events = events
        self.handlers = {handler.name: handler for handler in handlers}
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._reader: EventReader | None = None

    async def start(self) -> None:
        if not self.handlers:
            return
        self._reader = self._events.reader(READER, start="end")
        await self._reader.position()  # fixed now: batches ending from here on are handled
        self._executors = {h.name: ThreadPoolExecutor(max_workers=h.concurrency, thread_name_prefix=f"handler-{h.name}")
                           for h in self.handlers.values()}
        self._tasks = [asyncio.create_task(self._intake(), name="result handlers: intake"),
                       asyncio.create_task(self._dispatch(), name="result handlers: dispatch")]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for executor in self._executors.values():
            # A plain handle() still running is left to finish on its own; its run is retried at the next start.
            executor.shutdown(wait=False, cancel_futures=True)

    # ---- intake: from the event log to durable pending runs ---------------------------------------------

    async def _intake(self) -> None:
        assert self._reader is not None
        while True:
            try:
                events = await self._reader.next(IDLE_SECONDS)
                for event in events:
                    status = ENDED.get(event.type)
                    if status is None:
                        continue
                    names = [h.name for h in self.handlers.values() if status in h.statuses]
                    if names:
                        await self._db.add_handler_runs(event.batch_id, event.id, names, time.time())
                if events:
                    await self._reader.ack(events[-1])
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database refused (a full disk): nothing was acked, so try again
                log.exception("result handlers: could not read the event log; retrying in %ss",
                              ERROR_RETRY_SECONDS)
                await asyncio.sleep(ERROR_RETRY_SECONDS)

    # ---- dispatch: run what is due ------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        names = list(self.handlers)
        capacity = sum(h.concurrency for h in self.handlers.values())
        while True:
            self._wake.clear()  # before looking, so a change made meanwhile wakes us again
            try:
                now = time.time()
                busy = Counter(name for _, name in self._running)
                for row in await self._db.due_handler_runs(names, now, len(self._running) + capacity):
                    key = (row["batch_id"], row["handler"])
                    if key in self._running or busy[key[1]] >= self.handlers[key[1]].concurrency:
                        continue
                    busy[key[1]] += 1
                    task = asyncio.create_task(self._attempt(dict(row)), name=f"result handler {key[1]} {key[0]}")
                    self._running[key] = task
                upcoming = await self._db.next_handler_run_at(names, after=now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("result handlers: could not look for due runs; retrying in %ss", ERROR_RETRY_SECONDS)
                upcoming = time.time() + ERROR_RETRY_SECONDS
            wait = IDLE_SECONDS if upcoming is None else min(IDLE_SECONDS, max(0.01, upcoming - time.time()))
            await wait_event(self._wake, wait)

    async def _attempt(self, run: dict[str, Any]) -> None:
        batch_id, name = run["batch_id"], run["handler"]
        handler = self.handlers[name]
        attempt = run["attempts"] + 1
        try:
            await self._db.update_handler_run(batch_id, name, attempts=attempt, updated_at=int(time.time()))
            if attempt > handler.max_attempts:  # the server stopped during the last attempt
                await self._finish(batch_id, name, "failed", "the server stopped during the last attempt", None)
                return
            error: str | None = None
            try:
                ended = await self._ended_batch(batch_id, run["event_id"], attempt)
                await asyncio.wait_for(self._call(handler, ended), handler.timeout_seconds)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                error = f"no answer within {handler.timeout_seconds:g}s"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
            if error is None:
                log.info("result handler %s delivered batch %s (attempt %d)", name, batch_id, attempt)
                await self._finish(batch_id, name, "succeeded", None, None)
            elif attempt >= handler.max_attempts:
                log.error("result handler %s gave up on batch %s after %d attempts: %s", name, batch_id, attempt,
                          error)
                await self._finish(batch_id, name, "failed", error, None)
            else:
                delay = handler.backoff(attempt)
                log.warning("result handler %s failed on batch %s (attempt %d, next in %gs): %s", name, batch_id,
                            attempt, delay, error)
                await self._finish(batch_id, name, "retrying", error, time.time() + delay)
        except asyncio.CancelledError:
            raise
        except Exception:  # our own bookkeeping failed (a full disk): the run stays due and is tried again
            log.exception("result handler %s on batch %s: could not record the attempt", name, batch_id)
            await asyncio.sleep(ERROR_RETRY_SECONDS)
        finally:
            self._running.pop((batch_id, name), None)
            self._wake.set()

    async def _finish(self, batch_id: str, name: str, status: str, error: str | None,
                      next_attempt_at: float | None) -> None:
        changes: dict[str, Any] = {"status": status, "last_error": error, "updated_at": int(time.time())}
        if next_attempt_at is not None:
            changes["next_attempt_at"] = next_attempt_at
        await self._db.update_handler_run(batch_id, name, **changes)

    async def _call(self, handler: Handler, ended: EndedBatch) -> None:
        handle = handler.handler.handle
        if inspect.iscoroutinefunction(handle):
            await handle(ended)
            return
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executors[handler.name], handle, ended)
        if inspect.isawaitable(result):
            await result

    async def _ended_batch(self, batch_id: str, event_id: str, attempt: int) -> EndedBatch:
        batch = await self._db.get_batch(batch_id)
        if batch is None:
            raise LookupError(f"batch {batch_id} does not exist")

        def path(file_id: str | None) -> Any:
            if not file_id:
                return None
            found = self._blobs.file_path(file_id)
            return found if found.exists() else None

        return EndedBatch(id=batch.id, status=batch.status.value, batch=batch_object(batch),
                          input_path=path(batch.input_file_id), output_path=path(batch.output_file_id),
                          error_path=path(batch.error_file_id), event_id=event_id, attempt=attempt)
