"""The batch queue: validates new batches, runs them FIFO on the engines, finalizes, cancels and expires them.

It decides which models the engines should hold. With one model loaded at a time (the default), a batch whose
model differs from the loaded one waits for the running batches to finish, then the engine switches. With
`--max-loaded-models N`, up to N models stay loaded, one engine each: a batch of a loaded model starts at once
on its engine, beside the batches of the others, and a model not loaded is loaded into a free engine, or into
the least recently used idle one, in the background while the other engines keep running; while the head of
the queue waits for its engine, the next model further back may load ahead of its turn. On every engine, while
a batch's last requests are still in flight, the next batch of the same model may start, so the engine is
never idle at a batch's tail. The engines themselves (start, stop, sleep, restart, health) are owned by an
`EngineOwner` (engine_owner.py): the scheduler claims one for a model and tells it when one failed.

Every status change is asked of the lifecycle (lifecycle.py), which commits it with its event; the API never
writes a status, it calls `submit` and `cancel` here.

Online requests share the loaded engines but never decide which models they hold: unloading a model waits for
the online requests in flight on it to finish, and `--online-model` keeps one model loaded while online
requests keep coming. A batch due sooner (a shorter completion window) of a loaded model may start beside the
running ones; the engine's priority scheduling then runs its requests first (priority.py).

All state lives in SQLite; the scheduler's memory is only which runners are live on which engine, the engines'
states (in the owner) and which batches wait for a resource to come back. A restart rebuilds everything:
batches that were running resume from their checkpoint, half-finalized ones finish finalizing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from vllm_batch_server import ids
from vllm_batch_server.aio import wait_event
from vllm_batch_server.engines import served_models, unlisted_backends
from vllm_batch_server.engines.base import Engine, EngineError
from vllm_batch_server.exhaustion import Exhausted, exhausted
from vllm_batch_server.queue.engine_owner import (
    KEEP_MODEL_RETRY_SECONDS,
    Claim,
    EngineObserver,
    EngineOwner,
    EngineState,
    RetryAlone,
    Slot,
)
from vllm_batch_server.queue.online import OnlineTraffic
from vllm_batch_server.queue.priority import batch_priority
from vllm_batch_server.queue.runner import CANCELLED, EXPIRED, SHUTDOWN, BatchRunner
from vllm_batch_server.queue.validate import Report, validate_input
from vllm_batch_server.settings import Settings
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store import idempotency
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import ACTIVE_STATUSES, BatchRow, Database, FileRow
from vllm_batch_server.store.idempotency import IdempotencyKey
from vllm_batch_server.store.lifecycle import Lifecycle, now

log = logging.getLogger(__name__)

S = BatchStatus

# How long a batch that ran out of a resource of ours (disk, descriptors, memory) waits before trying again.
RESOURCE_RETRY_SECONDS = 2.0

# How often Idempotency-Keys older than idempotency.KEEP_SECONDS are forgotten.
KEY_SWEEP_SECONDS = 3600


class NotCancellable(Exception):
    def __init__(self, status: BatchStatus) -> None:
        super().__init__(f"Cannot cancel a batch that is {status.value}.")
        self.status = status


@dataclass(frozen=True)
class Pause:
    reason: Exhausted
    until: float  # time.monotonic()


class Observer(EngineObserver, Protocol):
    """What the scheduler and its engine owner report, as it happens (metrics.py listens). Batch statuses are
    not reported here: whatever reacts to them reads the lifecycle's event log."""

    def batch_started(self, batch: BatchRow) -> None:
        """A runner started on a batch that has no committed result yet (its first run)."""

    def checkpoint_committed(self, seconds: float) -> None:
        """A running batch made a checkpoint durable, taking `seconds`. Called on its checkpoint thread."""


class _Unobserved:
    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        pass

    def model_slept(self, model: str) -> None:
        pass

    def model_woken(self, model: str, seconds: float) -> None:
        pass

    def batch_started(self, batch: BatchRow) -> None:
        pass

    def checkpoint_committed(self, seconds: float) -> None:
        pass


class Scheduler:
    def __init__(self, db: Database, blobs: Blobs, engine: Engine, settings: Settings,
                 lifecycle: Lifecycle, observer: Observer | None = None,
                 make_engine: Callable[[], Engine] | None = None) -> None:
        """`make_engine` builds another engine like `engine`, for `--max-loaded-models` above 1 (without it,
        one engine holds one model at a time)."""
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.lifecycle = lifecycle
        self.observer: Observer = observer or _Unobserved()
        # The latency controller's full window is the first engine's capacity; with several resident models
        # it narrows every engine's batch work alike, as they share the machine's cores (or the GPU).
        self.online = OnlineTraffic(settings, capacity=lambda: self.engine.capacity)
        self.engine_owner = EngineOwner(engine, settings, self.online, self.observer, make_engine)
        self.paused: dict[str, Pause] = {}  # batches waiting for a resource of ours to come back
        self._runners: dict[str, BatchRunner] = {}
        self.runners: Mapping[str, BatchRunner] = MappingProxyType(self._runners)  # read-only, for gauges
        self._slot_of: dict[str, Slot] = {}  # batch id -> the engine its runner feeds
        self.runner_slots: Mapping[str, Slot] = MappingProxyType(self._slot_of)  # read-only, for /status
        self._drivers: set[asyncio.Task[None]] = set()
        self._drivers_on: dict[Slot, set[asyncio.Task[None]]] = {}
        self._bringing = 0  # model loads started and not ended
        self._queue_changed = asyncio.Event()
        self._new_batch = asyncio.Event()
        # Batches waiting for backends' model lists to validate, with the backends they wait for.
        self._unlisted_wait: dict[str, frozenset[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._finalizing: set[str] = set()
        self._keys_swept = 0  # when old Idempotency-Keys were last forgotten

    @property
    def engine(self) -> Engine:
        """The engine the runners are given (the owner's)."""
        return self.engine_owner.engine

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
        await self.engine_owner.stop()

    async def preload(self) -> None:
        """Load models before any batch asks for them: the queued batches' models, oldest first, then
        `--online-model`, then the configured ones, as many as `--max-loaded-models` (one by default). Called
        before `start`, so nothing races it for the engines. A model that cannot load leaves its engine idle
        with `load_error` set (readiness reports it); batches are unaffected."""
        queued = [b.model for b in await self.db.batches_in([S.IN_PROGRESS]) if b.model and not b.outcome]
        # As the run loop would: the queue first, then the model kept for online requests.
        wanted = [*queued, self.settings.online_model, *self.settings.models]
        for model in list(dict.fromkeys(m for m in wanted if m))[:self.engine_owner.max_loaded]:
            await self.engine_owner.preload(model)

    async def submit(self, batch: BatchRow, key: IdempotencyKey | None = None) -> BatchRow:
        """Accept a new batch (durable when this returns) and validate it soon. Raises sqlite3.IntegrityError
        when `key` was recorded meanwhile by another request."""
        await self.lifecycle.create(batch, key)
        self._new_batch.set()
        return batch

    async def cancel(self, batch_id: str) -> BatchRow | None:
        """Start cancelling a batch; None if there is no such batch. Raises NotCancellable once it has ended
        (or is finalizing). Cancelling twice is harmless."""
        batch = await self.db.get_batch(batch_id)
        if batch is None:
            return None
        if batch.status in (S.CANCELLING, S.CANCELLED):
            return batch
        moved = await self.lifecycle.move(batch_id, S.CANCELLING, only_from=(S.VALIDATING, S.IN_PROGRESS))
        current = await self.db.get_batch(batch_id)
        assert current is not None
        if not moved:
            if current.status in (S.CANCELLING, S.CANCELLED):
                return current
            raise NotCancellable(current.status)
        runner = self._runners.get(batch_id)
        if runner is not None:
            runner.stop(CANCELLED)
        else:
            await self._finalize(current, S.CANCELLED)
        return await self.db.get_batch(batch_id) or current

    async def _recover(self) -> None:
        for batch in await self.db.batches_in(ACTIVE_STATUSES):
            if batch.status is S.FINALIZING or batch.outcome:
                await self._finalize(batch, BatchStatus(batch.outcome or S.COMPLETED))
            elif batch.status is S.CANCELLING:
                await self._finalize(batch, S.CANCELLED)
        # Blobs that no row names: an upload or output that crashed between rename and commit.
        known = await self.db.all_file_ids()
        for batch in await self.db.batches_in(ACTIVE_STATUSES):
            known.update(i for i in (batch.output_file_id, batch.error_file_id) if i)
        for orphan in self.blobs.stored_file_ids() - known:
            log.info("removing orphaned blob %s", orphan)
            self.blobs.remove_file(orphan)
        # Result parts of batches that already ended: a crash between the final commit and the clean-up.
        active = {batch.id for batch in await self.db.batches_in(ACTIVE_STATUSES)}
        for directory in list(self.blobs.batches_dir.iterdir()):
            if ids.is_batch_id(directory.name) and directory.name not in active:
                log.info("removing the leftover result parts of ended batch %s", directory.name)
                await asyncio.to_thread(self.blobs.remove_batch_dir, directory.name)

    # ---- validation --------------------------------------------------------------------------------------

    async def _validate_loop(self) -> None:
        while True:
            self._new_batch.clear()  # before looking, so a batch created meanwhile wakes us again
            validating = await self.db.batches_in([S.VALIDATING])
            still = {batch.id for batch in validating}
            self._unlisted_wait = {k: v for k, v in self._unlisted_wait.items() if k in still}  # cancelled leave
            for batch in validating:
                try:
                    await self._validate(batch)
                except Exception as exc:
                    if (kind := exhausted(exc)) is not None:  # ours to fix; it stays validating and is retried
                        log.error("could not validate batch %s, %s (%s); retrying", batch.id, kind.value, exc)
                        continue
                    log.exception("could not validate batch %s", batch.id)
                    await self._fail(batch, "server_error", "The input file could not be validated.")
            await wait_event(self._new_batch, 1 if self._unlisted_wait else 5)

    async def _validate(self, batch: BatchRow) -> None:
        path = self.blobs.file_path(batch.input_file_id)
        served = await served_models(self.engine, self.settings)  # with backends: what they serve now
        unchanged = self._unlisted_wait.get(batch.id) == frozenset(unlisted_backends(self.engine))
        if unchanged and not self._waited_out(batch):
            return  # no backend has listed its models since the last try: reading the file again would tell nothing
        report = await asyncio.to_thread(
            validate_input, path, endpoint=batch.endpoint, served_models=served,
            max_lines=self.settings.max_batch_lines, max_errors=self.settings.max_errors_reported,
            scratch=self.blobs.tmp_dir)
        if not report.ok and self._wait_for_model_lists(batch, report):
            return
        self._unlisted_wait.pop(batch.id, None)
        if report.ok:
            changed = await self.lifecycle.move(batch.id, S.IN_PROGRESS, only_from=[S.VALIDATING],
                                                total=report.total, model=report.model)
        else:
            changed = await self.lifecycle.move(batch.id, S.FAILED, only_from=[S.VALIDATING],
                                                errors=[e.as_dict() for e in report.errors], total=report.total)
        if changed:
            self._queue_changed.set()  # either way, the batches queued behind it may go now

    def _wait_for_model_lists(self, batch: BatchRow, report: Report) -> bool:
        """A model no backend lists is no reason to fail the batch while a backend has not said what it serves
        (starting, or slower than a health check under load): it stays validating, retried every second, for
        up to --backend-wait-seconds after it was created."""
        unlisted = unlisted_backends(self.engine)
        if not unlisted or not any(e.code == "model_not_found" for e in report.errors):
            return False
        if self._waited_out(batch):
            log.warning("batch %s: its model is not listed by any backend, and %s never answered /v1/models "
                        "within --backend-wait-seconds (%gs)", batch.id, ", ".join(unlisted),
                        self.settings.backend_wait_seconds)
            return False
        if batch.id not in self._unlisted_wait:
            log.info("batch %s waits to validate: %s has not yet listed its models", batch.id, ", ".join(unlisted))
        self._unlisted_wait[batch.id] = frozenset(unlisted)
        return True

    def _waited_out(self, batch: BatchRow) -> bool:
        return time.time() - batch.created_at > self.settings.backend_wait_seconds

    # ---- running -----------------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            self._queue_changed.clear()  # before looking, so a change made meanwhile wakes us again
            waiting = await self._waiting()
            batch = self._pick(waiting)
            owner = self.engine_owner
            if batch is None:
                if (model := owner.model_to_keep()) is not None and (claim := owner.claim(model, self._busy)):
                    self._bring(claim, None)
                    continue
                await wait_event(self._queue_changed, self.settings.sweep_seconds)
                continue
            slot = await self._slot_for(batch, waiting)
            if slot is None:
                continue  # an engine changed, or the queue may have: look again
            feeding = [runner for runner in self._runners_on(slot) if not runner.input_exhausted.is_set()]
            if feeding and not self._sooner_than_running(batch, slot):
                # Its engine is still being handed an earlier batch's requests: start this one once they are all
                # out (so the engine is never idle at that batch's tail), or at once if it is due sooner.
                # Meanwhile the model of a batch further back may load into a free engine.
                self._prefetch(waiting, batch)
                await self._until_changed([asyncio.ensure_future(r.input_exhausted.wait()) for r in feeding],
                                          self._drivers_on.get(slot, set()))
                continue
            # Look again right before registering: a cancel or expiry may have ended it meanwhile, and the
            # engine may have failed. No await separates these checks from the registration, so the API's
            # cancel either sees the runner or finds the batch unclaimed and finalizes it itself.
            batch = await self.db.get_batch(batch.id)
            if (batch is None or batch.status is not S.IN_PROGRESS or batch.id in self._runners
                    or not slot.serves(batch.model)):
                continue
            self._start_runner(batch, slot)

    def _start_runner(self, batch: BatchRow, slot: Slot) -> None:
        runner = BatchRunner(self.lifecycle, self.blobs, slot.engine, self.settings, batch, self.online.batch_turns,
                             self.observer.checkpoint_committed)
        self._runners[batch.id] = runner
        self._slot_of[batch.id] = slot
        self.engine_owner.used(slot)
        if batch.output_offset == 0 and batch.error_offset == 0 and batch.engine_failures == 0:
            self.observer.batch_started(batch)
        driver = asyncio.create_task(self._drive(runner), name=f"run {batch.id}")
        on_slot = self._drivers_on.setdefault(slot, set())
        for drivers in (self._drivers, on_slot):
            drivers.add(driver)
            driver.add_done_callback(drivers.discard)

    async def _until_changed(self, waits: list[asyncio.Future[Any]], drivers: Iterable[asyncio.Task[None]]) -> None:
        """Until one of `waits` or `drivers` ends, the queue changes, or a sweep interval passes (the waits are
        then cancelled; the drivers go on)."""
        changed = asyncio.ensure_future(self._queue_changed.wait())
        try:
            await asyncio.wait([changed, *waits, *drivers], timeout=self.settings.sweep_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            for wait in waits:
                wait.cancel()

    async def _next_batch(self) -> BatchRow | None:
        return self._pick(await self._waiting())

    async def _waiting(self) -> list[BatchRow]:
        """The batches that wait for a runner, in creation order (validating ones included: nothing newer
        overtakes them)."""
        return [batch for batch in await self.db.batches_in([S.VALIDATING, S.IN_PROGRESS])
                # A batch with an outcome is being finalized; a paused one waits for a resource.
                if not (batch.id in self._runners or batch.outcome or batch.id in self.paused
                        or self._held_for_online(batch))]

    def _pick(self, waiting: list[BatchRow]) -> BatchRow | None:
        """The batch to run next: the oldest ready one, in creation order (while an older batch is still being
        validated, nothing newer starts: it would overtake it, and could force an extra model switch) — unless
        a batch of a loaded model is due sooner than that one and than every running batch: it goes first,
        with no model switch. Batches of other models than `--online-model` wait while online requests keep
        coming (with one model loaded at a time)."""
        if not waiting:
            return None
        head = waiting[0]
        owner = self.engine_owner
        if any(slot.state is EngineState.READY for slot in owner.slots):
            bar = min([batch_priority(head.completion_window),
                       *(batch_priority(r.batch.completion_window) for r in self._runners.values())])
            sooner = min((b for b in waiting if b.status is S.IN_PROGRESS and owner.serves(b.model)),
                         key=lambda b: (batch_priority(b.completion_window), b.seq), default=None)
            if sooner is not None and batch_priority(sooner.completion_window) < bar:
                return sooner
        return head if head.status is S.IN_PROGRESS else None

    def _sooner_than_running(self, batch: BatchRow, slot: Slot) -> bool:
        """Whether `batch` is due sooner than every batch running on `slot`'s engine (it then starts beside
        them, and the engine's priority scheduling runs its requests first)."""
        running = [batch_priority(r.batch.completion_window) for r in self._runners_on(slot)]
        return bool(running) and batch_priority(batch.completion_window) < min(running)

    def _held_for_online(self, batch: BatchRow) -> bool:
        """A batch of another model than `--online-model` waits while online requests keep coming — with one
        model loaded at a time; with several, the online model keeps its engine and the batch gets another."""
        pinned = self.settings.online_model
        return (self.engine_owner.max_loaded == 1 and pinned is not None and batch.model is not None
                and batch.model != pinned and self.online.recent(self.settings.online_idle_seconds))

    def want_online(self, model: str) -> None:
        """An online request asked for a served model that is not loaded: load it once nothing else runs (see
        EngineOwner.model_to_keep)."""
        self.online.want(model)
        self._queue_changed.set()

    def online_engine_failed(self, exc: BaseException, model: str | None = None) -> None:
        """An online request found the engine of `model` broken: restart it before anything else runs on it
        (with no batch running on it, the run loop restarts it with the model it had)."""
        self.engine_owner.failed_under_online(exc, model)
        self._queue_changed.set()

    # ---- engines: which one runs a batch, loading, unloading -------------------------------------------

    def _busy(self, slot: Slot) -> bool:
        """Whether a batch runs on `slot`'s engine (its driver has not ended)."""
        return bool(self._drivers_on.get(slot))

    def _runners_on(self, slot: Slot) -> list[BatchRunner]:
        return [self._runners[batch_id] for batch_id, on in list(self._slot_of.items())
                if on is slot and batch_id in self._runners]

    async def _slot_for(self, batch: BatchRow, waiting: list[BatchRow]) -> Slot | None:
        """The engine to run `batch` on now. If none is ready for it (another model, failed, suspect, asleep),
        claim one (never one running a batch) and load the model in the background, or wait for a batch to
        end; return None either way, so the caller picks again: a batch that ended in an engine failure is
        older than this one and must resume first."""
        owner = self.engine_owner
        held = owner.holding(batch.model)
        if held is not None:
            if held.state is EngineState.READY and await owner.ready_in(held, idle=not self._busy(held)):
                return held
            if held.state is EngineState.LOADING or (held.state is not EngineState.ASLEEP and self._busy(held)):
                # Loading (its end is a queue change), or failed or suspect: never restarted under a batch.
                await self._until_changed([], self._drivers_on.get(held, set()))
                return None
        assert batch.model is not None
        claim = owner.claim(batch.model, self._busy, needed=self._needed(waiting))
        if claim is None:
            await self._until_changed([], set(self._drivers))  # every engine that could make room runs a batch
            return None
        self._bring(claim, batch)
        return None

    @staticmethod
    def _needed(waiting: list[BatchRow]) -> set[str]:
        return {batch.model for batch in waiting if batch.model is not None}

    def _prefetch(self, waiting: list[BatchRow], head: BatchRow) -> None:
        """While `head` waits for its engine's earlier batch, start loading the first model further back in
        the queue that no engine holds — where that costs nothing queued: into an engine that is free, or
        whose model no waiting batch needs and online requests have not used lately."""
        if self.engine_owner.max_loaded == 1 or self._bringing:
            return
        for batch in waiting:
            if batch is head or batch.status is not S.IN_PROGRESS or batch.model is None:
                continue
            if self.engine_owner.holding(batch.model) is not None:
                continue
            claim = self.engine_owner.claim(batch.model, self._busy, prefetch=True, needed=self._needed(waiting))
            if claim is not None:
                log.info("loading model %s ahead of its batch %s", batch.model, batch.id)
                self._bring(claim, batch)
            return

    def _bring(self, claim: Claim, batch: BatchRow | None) -> None:
        """Carry out a claim in the background (the run loop goes on starting batches on the other engines);
        its end is a queue change. `batch`: the batch it is for (None: the model kept for online requests)."""
        self._bringing += 1
        task = asyncio.create_task(self._bring_and_report(claim, batch), name=f"load {claim.model}")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _bring_and_report(self, claim: Claim, batch: BatchRow | None) -> None:
        """A model that cannot load fails its batch; a resource of ours that ran out pauses it."""
        owner = self.engine_owner
        try:
            await owner.bring(claim)
            if batch is None:
                owner.keep_loaded()
        except RetryAlone:
            pass  # picked again: loaded alone this time
        except Exception as exc:
            if batch is None:
                log.exception("could not load model %s for online requests; retrying in %.0fs", claim.model,
                              KEEP_MODEL_RETRY_SECONDS)
                owner.keep_failed()
            elif (kind := exhausted(exc)) is not None:
                self._pause(batch.id, kind, exc)
            else:
                log.exception("could not load model %s", claim.model)
                try:
                    current = await self.db.get_batch(batch.id) or batch
                    if current.id not in self._runners and current.status in (S.IN_PROGRESS, S.CANCELLING):
                        await self._fail(current, "model_load_failed",
                                         f"The model {claim.model!r} could not be loaded: {exc}")
                except Exception as failing:
                    if (kind := exhausted(failing)) is None:
                        raise
                    self._pause(batch.id, kind, failing)
        finally:
            self._bringing -= 1
            self._queue_changed.set()

    async def _drive(self, runner: BatchRunner) -> None:
        """Run a batch and end it. The runner stays registered until the batch is finalized, so neither the
        run loop nor the expiry sweep can start a second runner for it in between."""
        batch = runner.batch
        slot = self._slot_of.get(batch.id)
        try:
            try:
                outcome = await runner.run()
            except EngineError as exc:
                # First, before any await: nothing more may be given to this engine until it is restarted.
                if slot is not None:
                    self.engine_owner.failed(slot)
                if (kind := exhausted(exc)) is not None:
                    self._pause(batch.id, kind, exc)  # it died because we ran out, not because of the batch
                    return
                await self._engine_failed(batch, exc)
                return
            if runner.aborted and outcome in (CANCELLED, EXPIRED) and slot is not None:
                self.engine_owner.suspect(slot)
            if outcome is None:
                return  # a shutdown: stays in_progress and resumes at the next start
            current = await self.db.get_batch(batch.id)
            if current is None:
                return
            if current.status is S.CANCELLING:
                outcome = CANCELLED
            await self._finalize(current, outcome)
        except Exception as exc:
            if (kind := exhausted(exc)) is not None:
                self._pause(batch.id, kind, exc)
                return
            log.exception("batch %s stopped on an unexpected error", batch.id)
            await self._fail(batch, "server_error", f"The batch stopped on an internal error: {exc}")
        finally:
            self._runners.pop(batch.id, None)
            self._slot_of.pop(batch.id, None)
            if slot is not None:
                self.engine_owner.used(slot)
            self._queue_changed.set()

    async def _engine_failed(self, batch: BatchRow, exc: Exception) -> None:
        """Charge the batch one engine failure; past the limit, fail it keeping its results. The run loop
        restarts the engine before it gives it any batch."""
        current = await self.db.get_batch(batch.id) or batch
        failures = current.engine_failures + 1
        log.error("engine failed on batch %s (%d/%d): %s", batch.id, failures,
                  self.settings.engine_max_restarts, exc)
        if current.status is S.CANCELLING:
            await self._finalize(current, S.CANCELLED)
        elif failures > self.settings.engine_max_restarts:
            await self._fail(current, "engine_error", f"The engine failed {failures} times while running this "
                             f"batch; last error: {exc}. Results computed so far are kept.")
        else:
            await self.lifecycle.set_engine_failures(batch.id, failures)

    def _pause(self, batch_id: str, reason: Exhausted, exc: BaseException) -> None:
        """A resource of ours ran out: failing the batch would drop accepted work, and nothing committed is lost
        (the parts are cut back to the last checkpoint on resume), so wait and try again."""
        log.error("batch %s paused: %s (%s); retrying in %.0fs", batch_id, reason.value, exc,
                  RESOURCE_RETRY_SECONDS)
        self.paused[batch_id] = Pause(reason, time.monotonic() + RESOURCE_RETRY_SECONDS)
        # With the scheduler's own loops, so a shutdown cancels it, and apart from the drivers, so a model
        # switch does not wait for the resource to come back.
        task = asyncio.create_task(self._resume_after_pause(batch_id), name=f"resume {batch_id}")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _resume_after_pause(self, batch_id: str) -> None:
        await asyncio.sleep(RESOURCE_RETRY_SECONDS)
        pause = self.paused.pop(batch_id, None)
        batch = await self.db.get_batch(batch_id)
        if batch is not None and batch.id not in self._runners and (
                batch.outcome or batch.status in (S.FINALIZING, S.CANCELLING)):
            try:  # it was ending when the resource ran out: finish that (idempotent)
                await self._finalize(batch, BatchStatus(batch.outcome or S.CANCELLED))
            except Exception as exc:
                if (kind := exhausted(exc)) is None:
                    raise
                self._pause(batch_id, kind, exc)
                return
        if pause is not None:
            log.info("batch %s: retrying after being %s", batch_id, pause.reason.value)
        self._queue_changed.set()  # an in_progress batch is picked up again by the run loop

    # ---- ending ------------------------------------------------------------------------------------------

    async def _fail(self, batch: BatchRow, code: str, message: str) -> None:
        errors = [{"code": code, "line": None, "message": message, "param": None}]
        await self.lifecycle.record_errors(batch.id, errors)
        current = await self.db.get_batch(batch.id) or batch
        # A batch being cancelled ends cancelled whatever else goes wrong: that is what its owner asked for.
        await self._finalize(current, S.CANCELLED if current.status is S.CANCELLING else S.FAILED)

    async def _finalize(self, batch: BatchRow, outcome: BatchStatus) -> None:
        """Turn the committed result parts into registered files and end the batch. Idempotent: a crash
        anywhere in here is repaired by running it again at start-up."""
        if batch.id in self._finalizing:
            return
        self._finalizing.add(batch.id)
        try:
            await self._finalize_once(batch, outcome)
        finally:
            self._finalizing.discard(batch.id)

    async def _finalize_once(self, batch: BatchRow, outcome: BatchStatus) -> None:
        current = await self.db.get_batch(batch.id)
        while current is not None and not current.outcome:
            if current.status not in ACTIVE_STATUSES:
                return
            if current.status is S.CANCELLING:
                outcome = S.CANCELLED
            # Decide the file ids before any rename, so a crash mid-way can be finished with the same ids.
            output_file_id = ids.new_file_id() if current.output_offset > 0 else None
            error_file_id = ids.new_file_id() if current.error_offset > 0 else None
            if outcome is S.COMPLETED:
                # Fails only if a cancel won the race meanwhile: then look again, and end it cancelled.
                await self.lifecycle.move(current.id, S.FINALIZING, only_from=[S.IN_PROGRESS], outcome=outcome.value,
                                          output_file_id=output_file_id, error_file_id=error_file_id)
            else:
                await self.lifecycle.set_outcome(current.id, outcome, output_file_id=output_file_id,
                                                 error_file_id=error_file_id)
            current = await self.db.get_batch(batch.id)
        if current is None or current.status not in ACTIVE_STATUSES:
            return
        assert current.outcome is not None
        outcome = BatchStatus(current.outcome)
        out_part, err_part = self.blobs.part_paths(current.id)
        ended = now()
        expires = ended + current.output_expires_after if current.output_expires_after else None
        files: list[FileRow] = []
        for file_id, part, offset, name in (
            (current.output_file_id, out_part, current.output_offset, "output"),
            (current.error_file_id, err_part, current.error_offset, "errors"),
        ):
            if file_id:
                size = await asyncio.to_thread(self.blobs.promote_part, part, offset, file_id)
                files.append(FileRow(id=file_id, filename=f"{current.id}_{name}.jsonl", purpose="batch_output",
                                     bytes=size, created_at=ended, expires_at=expires))
        if not await self.lifecycle.move(current.id, outcome, files=files):
            raise RuntimeError(f"batch {current.id} could not move from {current.status.value} to "
                               f"{outcome.value}")
        await asyncio.to_thread(self.blobs.remove_batch_dir, current.id)
        log.info("batch %s %s", current.id, outcome.value)

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
        for batch in await self.db.batches_in([S.VALIDATING, S.IN_PROGRESS]):
            if batch.expires_at is None or batch.expires_at > moment:
                continue
            runner = self._runners.get(batch.id)
            if runner is not None:
                runner.stop(EXPIRED)
            elif batch.status is S.VALIDATING or batch.total == 0:
                await self._finalize(batch, S.EXPIRED)
            else:
                # Never started: every request gets its batch_expired line, through the same durable path.
                runner = BatchRunner(self.lifecycle, self.blobs, self.engine, self.settings, batch,
                                     on_checkpoint=self.observer.checkpoint_committed)
                runner.stop(EXPIRED)
                self._runners[batch.id] = runner
                await self._drive(runner)
        for file in await self.db.expired_files(moment):
            if await self.db.file_in_use(file.id) is None:
                await self.db.delete_file(file.id)
                self.blobs.remove_file(file.id)
        if moment - self._keys_swept >= KEY_SWEEP_SECONDS:
            await self.db.forget_idempotency_keys(moment - idempotency.KEEP_SECONDS)
            self._keys_swept = moment
