"""A batch's lifecycle: the one place that writes a batch row.

Every status change goes through `Lifecycle` and appends an event (`batch.created`, `batch.in_progress`, ...,
`batch.completed`) to the event log in the same SQLite transaction, so the log never misses a change and
never announces one that did not happen. Whatever reacts to batches (webhooks, metrics, the dashboard's live
view, result handlers) reads that log from its own durable cursor (events.py) instead of hooking into the
scheduler.

The rules live in `TRANSITIONS`. The UPDATE that moves a status only matches a row in one of the allowed
previous statuses, so two racing moves (a cancel and the end of the run, say) resolve to exactly one; and a
trigger made from the same table refuses any other UPDATE of the column, so an illegal move is impossible
even for code that bypasses this module.

The statuses and their rules (`TRANSITIONS`) live in the leaf `vllm_batch_server/statuses.py`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_batch_server.statuses import CREATED, OUTCOMES, STAMP, BatchStatus, event_type, predecessors

if TYPE_CHECKING:
    from vllm_batch_server.store.database import BatchRow, CheckpointCommitter, Database, FileRow
    from vllm_batch_server.store.idempotency import IdempotencyKey

S = BatchStatus


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class Event:
    """One line of the event log. `seq` orders the log; `id` is what a webhook delivery carries."""

    seq: int
    id: str
    type: str
    batch_id: str
    previous: BatchStatus | None
    created_at: int


class Lifecycle:
    """The only writer of batch rows: statuses (each with its event), and the outcome, errors, engine failures
    and checkpointed progress of a batch. The scheduler and the runners call it; the API asks the scheduler.
    Each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Replaced after every notification, so a reader that captured the current one before reading the
        # log can never miss the next append (events.py).
        self.appended = asyncio.Event()

    def _announce(self) -> None:
        self.appended.set()
        self.appended = asyncio.Event()

    async def create(self, batch: BatchRow, key: IdempotencyKey | None = None) -> BatchRow:
        """Insert a new batch (status validating) with its `batch.created` event, and the Idempotency-Key
        that created it, all in one transaction. Raises sqlite3.IntegrityError if the key was taken."""
        assert batch.status is S.VALIDATING
        async with self._db.writes() as tx:
            await tx.insert_batch(batch)
            await tx.insert_event(new_event_id(), CREATED, batch.id, None, batch.created_at)
            if key is not None:
                await tx.insert_idempotency_key(key, batch.id, batch.created_at)
        self._announce()
        return batch

    async def move(self, batch_id: str, to: BatchStatus, *, only_from: Iterable[BatchStatus] | None = None,
                   files: Iterable[FileRow] = (), **changes: Any) -> bool:
        """Move a batch to `to` if it is in a status allowed to precede it (narrowed by `only_from`), stamping
        the status's time, setting `changes`, registering `files` and appending the event, all in one
        transaction. Returns False, changing nothing, if the batch was not in such a status (a race lost)."""
        sources = predecessors(to)
        if only_from is not None:
            wanted = set(only_from)
            sources = tuple(s for s in sources if s in wanted)
        if not sources:
            raise ValueError(f"no batch may move to {to.value!r} from {only_from!r}")
        moment = now()
        changes = {**changes, "status": to, STAMP[to]: moment}
        async with self._db.writes() as tx:
            state = await tx.batch_state(batch_id)
            previous = state[0] if state else None
            if state is None or previous not in sources:
                return False
            if to is S.CANCELLING and state[1] is not None:
                return False  # already ending (its outcome is recorded): too late to cancel
            for file in files:
                await tx.insert_file(file)
            await tx.update_batch(batch_id, changes, [p.value for p in sources])
            await tx.insert_event(new_event_id(), event_type(to), batch_id, previous, moment)
        self._announce()
        return True

    # Writes that change no status, so announce nothing. Each is one transaction of its own, as the single
    # autocommit UPDATE the scheduler used to issue was.

    async def set_outcome(self, batch_id: str, outcome: BatchStatus, *, output_file_id: str | None = None,
                          error_file_id: str | None = None) -> bool:
        """Record how a batch will end and the ids its result files will get, before finalizing renames
        anything (so a crash mid-way finishes the same ending with the same ids). The status stays as it is
        until `move`. False if there is no such batch."""
        if outcome not in OUTCOMES:
            raise ValueError(f"{outcome.value!r} is not a way a batch ends")
        return await self._write(batch_id, {"outcome": outcome.value, "output_file_id": output_file_id,
                                            "error_file_id": error_file_id})

    async def record_errors(self, batch_id: str, errors: list[dict[str, Any]]) -> bool:
        """Set the batch's `errors` (what a failed batch reports); the status is moved separately."""
        return await self._write(batch_id, {"errors": errors})

    async def set_engine_failures(self, batch_id: str, failures: int) -> bool:
        """How many times the engine failed under this batch (the scheduler fails it past a limit)."""
        return await self._write(batch_id, {"engine_failures": failures})

    def checkpoint_committer(self) -> CheckpointCommitter:
        """The writer of one running batch's progress (offsets, request counts, usage), for its result log's
        syncer thread: one statement per checkpoint on a connection of its own (see store/database.py)."""
        return self._db.checkpoint_committer()

    async def _write(self, batch_id: str, changes: dict[str, Any]) -> bool:
        async with self._db.writes() as tx:
            return await tx.update_batch(batch_id, changes)
