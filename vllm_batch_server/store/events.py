"""Reading the lifecycle's event log: in order, from a durable cursor, woken as soon as an event is appended.

Each consumer (webhooks, metrics, the dashboard's live view, result handlers) is an `EventReader` with a name.
It handles the events it is given and then `ack`s the last one, which commits its cursor. A consumer that
crashes before its ack is given the same events again after the restart: delivery is at least once, never
zero times, so consumers make their own handling idempotent (e.g. by the event's id).
"""

from __future__ import annotations

from typing import Literal

from vllm_batch_server.aio import wait_event
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.database import Database
from vllm_batch_server.store.lifecycle import Event, Lifecycle


class EventLog:
    def __init__(self, db: Database, lifecycle: Lifecycle) -> None:
        self._db = db
        self._lifecycle = lifecycle

    async def after(self, seq: int, limit: int = 100, batch_id: str | None = None) -> list[Event]:
        """The events that follow `seq` (0: from the start), oldest first."""
        rows = await self._db.events_after(seq, limit, batch_id)
        return [Event(seq=row["seq"], id=row["id"], type=row["type"], batch_id=row["batch_id"],
                      previous=BatchStatus(row["previous"]) if row["previous"] else None,
                      created_at=row["created_at"]) for row in rows]

    async def wait_after(self, seq: int, timeout: float, limit: int = 100) -> list[Event]:
        """The events after `seq`; if there are none yet, wait up to `timeout` for one."""
        appended = self._lifecycle.appended  # taken before reading: an append after the read still wakes us
        events = await self.after(seq, limit)
        if events:
            return events
        await wait_event(appended, timeout)
        return await self.after(seq, limit)

    async def last_seq(self) -> int:
        return await self._db.last_event_seq()

    def reader(self, name: str, *, start: Literal["beginning", "end"]) -> EventReader:
        return EventReader(self, self._db, name, start)


class EventReader:
    """One consumer's position in the log, kept in SQLite under its name.

    A reader that has never acked starts at the beginning of the log or at its end (only what happens from
    now on), as its owner chooses.
    """

    def __init__(self, log: EventLog, db: Database, name: str, start: Literal["beginning", "end"]) -> None:
        self.name = name
        self._log = log
        self._db = db
        self._start = start
        self._position: int | None = None

    async def position(self) -> int:
        if self._position is None:
            stored = await self._db.cursor_of(self.name)
            if stored is None:
                stored = 0 if self._start == "beginning" else await self._log.last_seq()
                await self._db.set_cursor(self.name, stored)
            self._position = stored
        return self._position

    async def next(self, timeout: float, limit: int = 100) -> list[Event]:
        """The events after this reader's position, waiting up to `timeout` when there are none. The position
        moves only with `ack`, so calling this again without one returns the same events."""
        return await self._log.wait_after(await self.position(), timeout, limit)

    async def ack(self, event: Event) -> None:
        """`event` and everything before it are handled: commit the cursor past it."""
        await self._db.set_cursor(self.name, event.seq)
        self._position = max(self._position or 0, event.seq)
