"""SQLite: the one source of truth for which files and batches exist and how far each batch has got.

One connection (aiosqlite runs it on its own thread), WAL and `synchronous=FULL`, so a committed transaction
survives power loss and readers never wait for the writer. Every write goes through `_write_lock`: with one
shared connection, a statement issued while another coroutine holds a transaction open would silently join it.
Checkpoints are the one exception: each running batch commits them from its result log's own thread, on a
connection of its own (`CheckpointCommitter`), so making progress durable never waits for the event loop.

The batches table has one writer, the lifecycle (lifecycle.py): it writes a batch row through `writes()`, one
transaction with the row's event, and hands out the checkpoint committers. Nothing else here writes a batch.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from vllm_batch_server.statuses import ACTIVE, BatchStatus, transition_guard_sql

if TYPE_CHECKING:
    from vllm_batch_server.store.idempotency import IdempotencyKey

# Each entry moves the schema one version forward; PRAGMA user_version records how far a database has got.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        filename    TEXT NOT NULL,
        purpose     TEXT NOT NULL,
        bytes       INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER
    );
    CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE batches (
        seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
        id                   TEXT NOT NULL UNIQUE,
        endpoint             TEXT NOT NULL,
        input_file_id        TEXT NOT NULL,
        completion_window    TEXT NOT NULL,
        status               TEXT NOT NULL,
        model                TEXT,
        metadata             TEXT,
        errors               TEXT,
        output_expires_after INTEGER,
        output_file_id       TEXT,
        error_file_id        TEXT,
        created_at           INTEGER NOT NULL,
        in_progress_at       INTEGER,
        expires_at           INTEGER,
        finalizing_at        INTEGER,
        completed_at         INTEGER,
        failed_at            INTEGER,
        expired_at           INTEGER,
        cancelling_at        INTEGER,
        cancelled_at         INTEGER,
        total                INTEGER NOT NULL DEFAULT 0,
        completed            INTEGER NOT NULL DEFAULT 0,
        failed               INTEGER NOT NULL DEFAULT 0,
        input_tokens         INTEGER NOT NULL DEFAULT 0,
        cached_tokens        INTEGER NOT NULL DEFAULT 0,
        output_tokens        INTEGER NOT NULL DEFAULT 0,
        output_offset        INTEGER NOT NULL DEFAULT 0,
        error_offset         INTEGER NOT NULL DEFAULT 0,
        engine_failures      INTEGER NOT NULL DEFAULT 0,
        outcome              TEXT
    );
    CREATE INDEX batches_status ON batches (status, seq);
    CREATE INDEX batches_input ON batches (input_file_id);
    """,
    # The lifecycle's event log (lifecycle.py), each reader's durable position in it (events.py), and the
    # Idempotency-Key of every create that sent one (idempotency.py).
    """
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        type        TEXT NOT NULL,
        batch_id    TEXT NOT NULL,
        previous    TEXT,
        created_at  INTEGER NOT NULL
    );
    CREATE INDEX events_batch ON events (batch_id, seq);
    CREATE TABLE event_cursors (
        reader      TEXT PRIMARY KEY,
        seq         INTEGER NOT NULL
    );
    CREATE TABLE idempotency_keys (
        route       TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        object_id   TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (route, key)
    );
    CREATE INDEX idempotency_age ON idempotency_keys (created_at);
    """,
    # Results (docs/results.md): curation marks per result, the input line of each custom_id (built the
    # first time a batch is marked, so a mark can be checked and listed in input order), and the durable
    # state of every result handler's run for every ended batch (handlers/service.py).
    """
    CREATE TABLE marks (
        batch_id    TEXT NOT NULL,
        custom_id   TEXT NOT NULL,
        label       TEXT,
        score       REAL,
        note        TEXT,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (batch_id, custom_id)
    ) WITHOUT ROWID;
    CREATE TABLE request_lines (
        batch_id    TEXT NOT NULL,
        custom_id   TEXT NOT NULL,
        line        INTEGER NOT NULL,
        PRIMARY KEY (batch_id, custom_id)
    ) WITHOUT ROWID;
    CREATE TABLE request_lines_built (
        batch_id    TEXT PRIMARY KEY,
        lines       INTEGER NOT NULL
    );
    CREATE TABLE handler_runs (
        batch_id        TEXT NOT NULL,
        handler         TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        status          TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        next_attempt_at REAL NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        PRIMARY KEY (batch_id, handler)
    );
    CREATE INDEX handler_runs_due ON handler_runs (status, next_attempt_at);
    """,
    # Webhook deliveries (webhooks.py): one row per event and receiver, written before the webhooks reader
    # acks the event, so a delivery survives kill -9 until it succeeds or its retry time runs out. `id` is the
    # `webhook-id` header, the same on every attempt.
    """
    CREATE TABLE webhook_deliveries (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        id               TEXT NOT NULL UNIQUE,
        event_id         TEXT NOT NULL,
        event_type       TEXT NOT NULL,
        batch_id         TEXT NOT NULL,
        url              TEXT NOT NULL,
        source           TEXT NOT NULL,
        payload          TEXT NOT NULL,
        status           TEXT NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        created_at       INTEGER NOT NULL,
        next_attempt_at  REAL,
        last_attempt_at  INTEGER,
        last_status_code INTEGER,
        last_error       TEXT,
        delivered_at     INTEGER,
        UNIQUE (event_id, url)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
    CREATE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_id, seq);
    """,
]

ACTIVE_STATUSES = tuple(s.value for s in ACTIVE)


@dataclass
class FileRow:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    seq: int | None = None


@dataclass
class BatchRow:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    model: str | None = None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_expires_after: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    output_offset: int = 0
    error_offset: int = 0
    engine_failures: int = 0
    # The terminal status a finalizing batch is heading for (completed, cancelled, expired or failed).
    outcome: str | None = None
    seq: int | None = None


_JSON_COLUMNS = {"metadata", "errors"}
_BATCH_COLUMNS = [f.name for f in fields(BatchRow) if f.name != "seq"]


def _encode(column: str, value: Any) -> Any:
    return json.dumps(value) if column in _JSON_COLUMNS and value is not None else value


def _batch_from(row: aiosqlite.Row) -> BatchRow:
    data = dict(row)
    for column in _JSON_COLUMNS:
        if data[column] is not None:
            data[column] = json.loads(data[column])
    data["status"] = BatchStatus(data["status"])
    return BatchRow(**data)


@dataclass
class Checkpoint:
    """Progress made durable in one transaction, after the result files were fsynced up to the offsets."""

    output_offset: int
    error_offset: int
    completed: int
    failed: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int

    @property
    def results(self) -> int:
        return self.completed + self.failed


_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA busy_timeout=10000")


class Database:
    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._write_lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> Database:
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        conn.row_factory = aiosqlite.Row
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
        db = cls(conn, path)
        await db._migrate()
        return db

    async def close(self) -> None:
        await self._conn.close()

    async def _migrate(self) -> None:
        row = await self._query_one("PRAGMA user_version")
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")
        # Made anew at every start from statuses.TRANSITIONS, so the database never holds an older rule.
        await self._conn.executescript(f"BEGIN IMMEDIATE; {transition_guard_sql()}; COMMIT;")

    async def _query(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        """Run a read to completion in one call. A cursor left open across an await would hold a read
        snapshot, and a write on this connection after a checkpoint commit (another connection) would then
        fail at once with "database is locked" (a stale snapshot cannot be upgraded; busy_timeout never
        applies)."""
        return list(await self._conn.execute_fetchall(sql, tuple(params)))

    async def _query_one(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        rows = await self._query(sql, params)
        return rows[0] if rows else None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction on the shared connection, for this module's own writes; the lifecycle gets one through
        `writes()`, with the statements it may run."""
        async with self._write_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def writes(self) -> AsyncIterator[BatchWrites]:
        """One transaction for the lifecycle's writes to a batch row and what goes with them (its event, its
        files, its Idempotency-Key): all committed together or none. Only `store/lifecycle.py` calls this
        (tests/server/test_layers.py checks it), so the lifecycle is the one writer of the batches table."""
        async with self._transaction() as conn:
            yield BatchWrites(conn)

    # ---- files -------------------------------------------------------------------------------------------

    async def insert_file(self, file: FileRow, key: IdempotencyKey | None = None) -> FileRow:
        """Register an uploaded file, with the Idempotency-Key that created it in the same transaction. Raises
        sqlite3.IntegrityError if the key was recorded meanwhile."""
        async with self._transaction() as conn:
            writes = BatchWrites(conn)  # the file and key statements only: no batch row is written here
            await writes.insert_file(file)
            if key is not None:
                await writes.insert_idempotency_key(key, file.id, file.created_at)
        return file

    async def get_file(self, file_id: str) -> FileRow | None:
        row = await self._query_one("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRow(**dict(row)) if row else None

    async def list_files(self, *, after_seq: int | None, limit: int, descending: bool,
                         purpose: str | None) -> list[FileRow]:
        """One page plus one row, so the caller can tell whether there is more."""
        where: list[str] = []
        params: list[Any] = []
        if after_seq is not None:
            where.append("seq < ?" if descending else "seq > ?")
            params.append(after_seq)
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        sql = "SELECT * FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        return [FileRow(**dict(row)) for row in await self._query(sql, (*params, limit + 1))]

    async def delete_file(self, file_id: str) -> bool:
        async with self._transaction() as conn:
            cursor = await conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return cursor.rowcount > 0

    async def expired_files(self, now: int) -> list[FileRow]:
        rows = await self._query("SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        return [FileRow(**dict(row)) for row in rows]

    async def all_file_ids(self) -> set[str]:
        return {row[0] for row in await self._query("SELECT id FROM files")}

    async def file_in_use(self, file_id: str) -> BatchRow | None:
        """The active batch reading this file as its input, if any."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        row = await self._query_one(
            f"SELECT * FROM batches WHERE input_file_id = ? AND status IN ({marks}) LIMIT 1",
            (file_id, *ACTIVE_STATUSES))
        return _batch_from(row) if row else None

    # ---- batches -----------------------------------------------------------------------------------------

    async def get_batch(self, batch_id: str) -> BatchRow | None:
        row = await self._query_one("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch_from(row) if row else None

    async def list_batches(self, *, after_seq: int | None, limit: int, statuses: Iterable[str] = (),
                           model: str | None = None) -> list[BatchRow]:
        """Newest first, one page plus one row; only the given statuses and model when they are given."""
        where: list[str] = []
        params: list[Any] = []
        if after_seq is not None:
            where.append("seq < ?")
            params.append(after_seq)
        statuses = tuple(statuses)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        sql = "SELECT * FROM batches"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        return [_batch_from(row) for row in await self._query(sql, (*params, limit + 1))]

    async def batches_in(self, statuses: Iterable[str]) -> list[BatchRow]:
        """Batches in these statuses, oldest first: the queue order."""
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        rows = await self._query(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq ASC", statuses)
        return [_batch_from(row) for row in rows]

    def checkpoint_committer(self) -> CheckpointCommitter:
        """The writer of one running batch's progress columns, on a connection of its own. Only the lifecycle
        hands these out (Lifecycle.checkpoint_committer)."""
        return CheckpointCommitter(self.path)

    # ---- the event log (written by lifecycle.py, read by events.py) -----------------------------------------

    async def events_after(self, seq: int, limit: int, batch_id: str | None = None) -> list[aiosqlite.Row]:
        if batch_id is None:
            return await self._query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return await self._query("SELECT * FROM events WHERE batch_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                                 (batch_id, seq, limit))

    async def last_event_seq(self) -> int:
        row = await self._query_one("SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(row[0]) if row else 0

    async def cursor_of(self, reader: str) -> int | None:
        row = await self._query_one("SELECT seq FROM event_cursors WHERE reader = ?", (reader,))
        return int(row[0]) if row else None

    async def set_cursor(self, reader: str, seq: int) -> None:
        async with self._write_lock:
            await self._conn.execute(
                "INSERT INTO event_cursors (reader, seq) VALUES (?, ?) "
                "ON CONFLICT (reader) DO UPDATE SET seq = MAX(seq, excluded.seq)", (reader, seq))

    # ---- numbers for metrics and /status (monitor.py) -------------------------------------------------------

    async def progress(self, ended_after: int | None) -> list[aiosqlite.Row]:
        """Batch counts, committed results and tokens, grouped by part, status, model and endpoint, in one
        statement (so one consistent snapshot):

        - part "active": every batch not yet ended;
        - part "ended": batches that ended after event `ended_after` (with None: every ended batch). An ended
          batch's numbers never change again, so a caller adds these to what it has and reads only new ones;
        - part "upto": one row whose `count` is the last event's seq, the next call's `ended_after`.

        A batch's terminal status and its event are committed together, so in one snapshot a batch is either
        still active or has its terminal event: counted once, and the sums only ever grow. Cost: the active
        batches and the newly ended ones, not the whole table (measured at 100,000 batches, 1,000 of them
        active: 0.1 s for the first call, which reads the history, then 2 ms)."""
        sums = ("COUNT(*) AS count, SUM(b.completed) AS completed, SUM(b.failed) AS failed, "
                "SUM(b.input_tokens) AS input_tokens, SUM(b.cached_tokens) AS cached_tokens, "
                "SUM(b.output_tokens) AS output_tokens")
        active = ",".join("?" * len(ACTIVE_STATUSES))
        terminal = tuple(s.value for s in BatchStatus if s.value not in ACTIVE_STATUSES)
        ended_marks = ",".join("?" * len(terminal))
        if ended_after is None:
            ended = (f"SELECT 'ended' AS part, b.status, b.model, b.endpoint, {sums} FROM batches b "
                     f"WHERE b.status IN ({ended_marks}) GROUP BY b.status, b.model, b.endpoint")
            ended_params: tuple[Any, ...] = terminal
        else:
            ended_types = tuple(f"batch.{status}" for status in terminal)
            ended = (f"SELECT 'ended' AS part, b.status, b.model, b.endpoint, {sums} FROM events e "
                     f"JOIN batches b ON b.id = e.batch_id WHERE e.seq > ? AND e.type IN ({ended_marks}) "
                     "GROUP BY b.status, b.model, b.endpoint")
            ended_params = (ended_after, *ended_types)
        return await self._query(
            f"SELECT 'active' AS part, b.status, b.model, b.endpoint, {sums} FROM batches b "
            f"WHERE b.status IN ({active}) GROUP BY b.status, b.model, b.endpoint "
            f"UNION ALL {ended} "
            "UNION ALL SELECT 'upto', NULL, NULL, NULL, COALESCE(MAX(seq), 0), 0, 0, 0, 0, 0 FROM events",
            (*ACTIVE_STATUSES, *ended_params))

    async def resumable_batches(self) -> int:
        """Batches that stopped mid-run with committed results: they resume from their checkpoint."""
        row = await self._query_one(
            "SELECT COUNT(*) FROM batches WHERE status = 'in_progress' AND outcome IS NULL "
            "AND (output_offset > 0 OR error_offset > 0)")
        return int(row[0]) if row else 0

    # ---- webhook deliveries (webhooks.py) -----------------------------------------------------------------

    async def add_deliveries(self, rows: list[dict[str, Any]]) -> None:
        """Record deliveries to make; one already recorded for the same event and URL is left as it is (the
        webhooks reader may see an event twice after a crash)."""
        if not rows:
            return
        columns = ("id", "event_id", "event_type", "batch_id", "url", "source", "payload", "status",
                   "created_at", "next_attempt_at")
        async with self._transaction() as conn:
            await conn.executemany(
                f"INSERT OR IGNORE INTO webhook_deliveries ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})", [tuple(row[c] for c in columns) for row in rows])

    async def due_deliveries(self, now: float, limit: int, skip: Iterable[str],
                             source: str | None = None) -> list[aiosqlite.Row]:
        """Pending deliveries due by `now`, oldest first, but those in `skip`; only from `source` if given."""
        skip = tuple(skip)
        marks = ",".join("?" * len(skip))
        return await self._query(
            "SELECT * FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ? "
            + ("AND source = ? " if source is not None else "")
            + (f"AND id NOT IN ({marks}) " if skip else "") + "ORDER BY next_attempt_at LIMIT ?",
            (now, *((source,) if source is not None else ()), *skip, limit))

    async def next_delivery_at(self, skip: Iterable[str]) -> float | None:
        """When the next pending delivery not in `skip` (being attempted) falls due."""
        skip = tuple(skip)
        marks = ",".join("?" * len(skip))
        row = await self._query_one(
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'"
            + (f" AND id NOT IN ({marks})" if skip else ""), skip)
        return float(row[0]) if row and row[0] is not None else None

    async def update_delivery(self, delivery_id: str, *, attempted: bool, **changes: Any) -> None:
        sets = ", ".join([*(f"{column} = ?" for column in changes), *(["attempts = attempts + 1"] if attempted
                                                                       else [])])
        async with self._write_lock:
            await self._conn.execute(f"UPDATE webhook_deliveries SET {sets} WHERE id = ?",
                                     (*changes.values(), delivery_id))

    async def deliveries_of(self, batch_id: str) -> list[aiosqlite.Row]:
        return await self._query("SELECT * FROM webhook_deliveries WHERE batch_id = ? ORDER BY seq", (batch_id,))

    async def pending_deliveries(self) -> int:
        row = await self._query_one("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'")
        return int(row[0]) if row else 0

    # ---- idempotency keys (idempotency.py) -------------------------------------------------------------------

    async def idempotent_object(self, route: str, key: str) -> tuple[str, str] | None:
        """(fingerprint, object id) recorded for this key on this route."""
        row = await self._query_one("SELECT fingerprint, object_id FROM idempotency_keys WHERE route = ? AND key = ?",
                                    (route, key))
        return (row[0], row[1]) if row else None

    async def forget_idempotency_key(self, route: str, key: str) -> None:
        async with self._write_lock:
            await self._conn.execute("DELETE FROM idempotency_keys WHERE route = ? AND key = ?", (route, key))

    async def forget_idempotency_keys(self, before: int) -> None:
        async with self._write_lock:
            await self._conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (before,))


    # ---- curation marks and the custom_id → input line index they are checked against (marks.py) ----------

    async def request_lines_built(self, batch_id: str) -> int | None:
        """How many input lines the index holds for this batch, or None if it has not been built."""
        row = await self._query_one("SELECT lines FROM request_lines_built WHERE batch_id = ?", (batch_id,))
        return int(row[0]) if row else None

    async def add_request_lines(self, batch_id: str, rows: list[tuple[str, int]]) -> None:
        """One chunk of (custom_id, line) for a batch whose index is being built."""
        async with self._transaction() as conn:
            await conn.executemany("INSERT OR IGNORE INTO request_lines (batch_id, custom_id, line) VALUES (?, ?, ?)",
                                   [(batch_id, custom_id, line) for custom_id, line in rows])

    async def finish_request_lines(self, batch_id: str, lines: int) -> None:
        async with self._write_lock:
            await self._conn.execute("INSERT OR REPLACE INTO request_lines_built (batch_id, lines) VALUES (?, ?)",
                                     (batch_id, lines))

    async def request_line(self, batch_id: str, custom_id: str) -> int | None:
        row = await self._query_one("SELECT line FROM request_lines WHERE batch_id = ? AND custom_id = ?",
                                    (batch_id, custom_id))
        return int(row[0]) if row else None

    async def set_mark(self, batch_id: str, custom_id: str, label: str | None, score: float | None,
                       note: str | None, updated_at: int) -> None:
        async with self._write_lock:
            await self._conn.execute(
                "INSERT INTO marks (batch_id, custom_id, label, score, note, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (batch_id, custom_id) DO UPDATE SET label = excluded.label, score = excluded.score, "
                "note = excluded.note, updated_at = excluded.updated_at",
                (batch_id, custom_id, label, score, note, updated_at))

    async def delete_mark(self, batch_id: str, custom_id: str) -> bool:
        async with self._write_lock:
            cursor = await self._conn.execute("DELETE FROM marks WHERE batch_id = ? AND custom_id = ?",
                                              (batch_id, custom_id))
            return cursor.rowcount > 0

    async def get_mark(self, batch_id: str, custom_id: str) -> aiosqlite.Row | None:
        return await self._query_one("SELECT * FROM marks WHERE batch_id = ? AND custom_id = ?",
                                     (batch_id, custom_id))

    async def list_marks(self, batch_id: str, *, after_line: int, limit: int,
                         label: str | None = None) -> list[aiosqlite.Row]:
        """Marks in input order after an input line, one page plus one row."""
        sql = ("SELECT m.*, r.line AS line FROM marks m JOIN request_lines r "
               "ON r.batch_id = m.batch_id AND r.custom_id = m.custom_id WHERE m.batch_id = ? AND r.line > ?")
        params: list[Any] = [batch_id, after_line]
        if label is not None:
            sql += " AND m.label = ?"
            params.append(label)
        sql += " ORDER BY r.line LIMIT ?"
        return await self._query(sql, (*params, limit + 1))

    # ---- result handler runs (handlers/service.py) ---------------------------------------------------------

    async def add_handler_runs(self, batch_id: str, event_id: str, handlers: Iterable[str], now: float) -> None:
        """A pending run of each handler for an ended batch; a run that exists already is left as it is, so an
        event read twice (at least once) adds nothing."""
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT OR IGNORE INTO handler_runs (batch_id, handler, event_id, status, attempts, next_attempt_at, "
                "created_at, updated_at) VALUES (?, ?, ?, 'pending', 0, ?, ?, ?)",
                [(batch_id, name, event_id, now, int(now), int(now)) for name in handlers])

    async def due_handler_runs(self, handlers: Iterable[str], now: float, limit: int) -> list[aiosqlite.Row]:
        names = tuple(handlers)
        if not names:
            return []
        marks = ",".join("?" * len(names))
        return await self._query(
            f"SELECT * FROM handler_runs WHERE status IN ('pending', 'retrying') AND next_attempt_at <= ? "
            f"AND handler IN ({marks}) ORDER BY next_attempt_at LIMIT ?", (now, *names, limit))

    async def next_handler_run_at(self, handlers: Iterable[str], after: float) -> float | None:
        """When the next run not yet due falls due."""
        names = tuple(handlers)
        if not names:
            return None
        marks = ",".join("?" * len(names))
        row = await self._query_one(
            f"SELECT MIN(next_attempt_at) FROM handler_runs WHERE status IN ('pending', 'retrying') "
            f"AND next_attempt_at > ? AND handler IN ({marks})", (after, *names))
        return float(row[0]) if row and row[0] is not None else None

    async def update_handler_run(self, batch_id: str, handler: str, **changes: Any) -> None:
        sets = ", ".join(f"{column} = ?" for column in changes)
        async with self._write_lock:
            await self._conn.execute(f"UPDATE handler_runs SET {sets} WHERE batch_id = ? AND handler = ?",
                                     (*changes.values(), batch_id, handler))

    async def handler_runs_of(self, batch_id: str) -> list[aiosqlite.Row]:
        return await self._query("SELECT * FROM handler_runs WHERE batch_id = ? ORDER BY handler", (batch_id,))



class BatchWrites:
    """The statements of one open transaction (`Database.writes()`), for the lifecycle: the batch row, its
    event, the files it registers and the Idempotency-Key that created it. Nothing here commits; the
    transaction does, all of it or none."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def batch_state(self, batch_id: str) -> tuple[BatchStatus, str | None] | None:
        """(status, outcome) of a batch as this transaction sees it; None if there is no such batch."""
        rows = list(await self._conn.execute_fetchall("SELECT status, outcome FROM batches WHERE id = ?",
                                                      (batch_id,)))
        return (BatchStatus(rows[0][0]), rows[0][1]) if rows else None

    async def insert_batch(self, batch: BatchRow) -> None:
        columns = ", ".join(_BATCH_COLUMNS)
        marks = ", ".join("?" * len(_BATCH_COLUMNS))
        values = [_encode(c, getattr(batch, c)) for c in _BATCH_COLUMNS]
        cursor = await self._conn.execute(f"INSERT INTO batches ({columns}) VALUES ({marks})", values)
        batch.seq = cursor.lastrowid

    async def update_batch(self, batch_id: str, changes: dict[str, Any],
                           only_if_status: Iterable[str] | None = None) -> bool:
        """Set columns of a batch row (only while it is in one of `only_if_status`, when given). False if no
        row matched."""
        sets = ", ".join(f"{column} = ?" for column in changes)
        params: list[Any] = [_encode(c, v) for c, v in changes.items()]
        sql = f"UPDATE batches SET {sets} WHERE id = ?"
        params.append(batch_id)
        if only_if_status is not None:
            statuses = tuple(only_if_status)
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            params.extend(statuses)
        cursor = await self._conn.execute(sql, params)
        return cursor.rowcount > 0

    async def insert_file(self, file: FileRow) -> None:
        await self._conn.execute(
            "INSERT OR IGNORE INTO files (id, filename, purpose, bytes, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (file.id, file.filename, file.purpose, file.bytes, file.created_at, file.expires_at),
        )

    async def insert_event(self, event_id: str, type: str, batch_id: str, previous: str | None,
                           created_at: int) -> int:
        cursor = await self._conn.execute(
            "INSERT INTO events (id, type, batch_id, previous, created_at) VALUES (?, ?, ?, ?, ?)",
            (event_id, type, batch_id, previous, created_at))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def insert_idempotency_key(self, key: IdempotencyKey, object_id: str, created_at: int) -> None:
        # Raises sqlite3.IntegrityError when another request recorded the same key first.
        await self._conn.execute(
            "INSERT INTO idempotency_keys (route, key, fingerprint, object_id, created_at) VALUES (?, ?, ?, ?, ?)",
            (key.route, key.key, key.fingerprint, object_id, created_at))


class CheckpointCommitter:
    """Commits one result log's checkpoints from its syncer thread (see checkpoint.py).

    A connection of its own, opened and used only on that thread: the shared connection would put every commit
    behind the event loop, which at full speed is busy for tens of milliseconds at a time. SQLite serializes it
    with the db's writes (busy_timeout); it only ever sets a running batch's progress columns, which nothing
    else writes while the batch runs.
    """

    SQL = ("UPDATE batches SET output_offset = ?, error_offset = ?, completed = ?, failed = ?, input_tokens = ?, "
           "cached_tokens = ?, output_tokens = ? WHERE id = ?")

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def commit(self, batch_id: str, point: Checkpoint) -> None:
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, isolation_level=None)
            for pragma in _PRAGMAS:
                self._conn.execute(pragma)
        # One statement in autocommit mode: its own durable transaction.
        self._conn.execute(self.SQL, (point.output_offset, point.error_offset, point.completed, point.failed,
                                      point.input_tokens, point.cached_tokens, point.output_tokens, batch_id))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
