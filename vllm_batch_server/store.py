"""SQLite: the one source of truth for which files and batches exist and how far each batch has got.

One connection (aiosqlite runs it on its own thread), WAL and `synchronous=FULL`, so a committed transaction
survives power loss and readers never wait for the writer. Every write goes through `_write_lock`: with one
shared connection, a statement issued while another coroutine holds a transaction open would silently join it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiosqlite

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
]

# Statuses in which a batch still needs the scheduler's attention.
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


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
    status: str
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
    extra: dict[str, Any] = field(default_factory=dict)


class Store:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA busy_timeout=10000")
        store = cls(conn)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._conn.close()

    async def _migrate(self) -> None:
        async with self._conn.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    # ---- files -------------------------------------------------------------------------------------------

    async def insert_file(self, file: FileRow) -> FileRow:
        async with self.transaction() as conn:
            await self._insert_file(conn, file)
        return file

    @staticmethod
    async def _insert_file(conn: aiosqlite.Connection, file: FileRow) -> None:
        await conn.execute(
            "INSERT OR IGNORE INTO files (id, filename, purpose, bytes, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (file.id, file.filename, file.purpose, file.bytes, file.created_at, file.expires_at),
        )

    async def get_file(self, file_id: str) -> FileRow | None:
        async with self._conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)) as cursor:
            row = await cursor.fetchone()
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
        async with self._conn.execute(sql, (*params, limit + 1)) as cursor:
            return [FileRow(**dict(row)) for row in await cursor.fetchall()]

    async def delete_file(self, file_id: str) -> bool:
        async with self.transaction() as conn:
            cursor = await conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return cursor.rowcount > 0

    async def expired_files(self, now: int) -> list[FileRow]:
        async with self._conn.execute(
            "SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        ) as cursor:
            return [FileRow(**dict(row)) for row in await cursor.fetchall()]

    async def all_file_ids(self) -> set[str]:
        async with self._conn.execute("SELECT id FROM files") as cursor:
            return {row[0] for row in await cursor.fetchall()}

    async def file_in_use(self, file_id: str) -> BatchRow | None:
        """The active batch reading this file as its input, if any."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        async with self._conn.execute(
            f"SELECT * FROM batches WHERE input_file_id = ? AND status IN ({marks}) LIMIT 1",
            (file_id, *ACTIVE_STATUSES),
        ) as cursor:
            row = await cursor.fetchone()
        return _batch_from(row) if row else None

    # ---- batches -----------------------------------------------------------------------------------------

    async def insert_batch(self, batch: BatchRow) -> BatchRow:
        columns = ", ".join(_BATCH_COLUMNS)
        marks = ", ".join("?" * len(_BATCH_COLUMNS))
        values = [_encode(c, getattr(batch, c)) for c in _BATCH_COLUMNS]
        async with self.transaction() as conn:
            cursor = await conn.execute(f"INSERT INTO batches ({columns}) VALUES ({marks})", values)
            batch.seq = cursor.lastrowid
        return batch

    async def get_batch(self, batch_id: str) -> BatchRow | None:
        async with self._conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)) as cursor:
            row = await cursor.fetchone()
        return _batch_from(row) if row else None

    async def list_batches(self, *, after_seq: int | None, limit: int) -> list[BatchRow]:
        """Newest first, one page plus one row."""
        params: tuple[int, ...]
        if after_seq is None:
            sql, params = "SELECT * FROM batches ORDER BY seq DESC LIMIT ?", (limit + 1,)
        else:
            sql, params = "SELECT * FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?", (after_seq, limit + 1)
        async with self._conn.execute(sql, params) as cursor:
            return [_batch_from(row) for row in await cursor.fetchall()]

    async def batches_in(self, statuses: Iterable[str]) -> list[BatchRow]:
        """Batches in these statuses, oldest first: the queue order."""
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        async with self._conn.execute(
            f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq ASC", statuses
        ) as cursor:
            return [_batch_from(row) for row in await cursor.fetchall()]

    async def update_batch(self, batch_id: str, *, only_if_status: Iterable[str] | None = None,
                           **changes: Any) -> bool:
        """Set columns; with `only_if_status`, only when the batch is still in one of those statuses.

        Returns whether a row changed, so racing transitions (cancel vs. completion) resolve to exactly one.
        One statement in autocommit mode is its own durable transaction: no BEGIN/COMMIT round trips (this
        runs at every checkpoint). The lock still keeps it out of another coroutine's open transaction.
        """
        async with self._write_lock:
            return await self._update_batch(self._conn, batch_id, only_if_status, changes)

    @staticmethod
    async def _update_batch(conn: aiosqlite.Connection, batch_id: str, only_if_status: Iterable[str] | None,
                            changes: dict[str, Any]) -> bool:
        sets = ", ".join(f"{column} = ?" for column in changes)
        params: list[Any] = [_encode(c, v) for c, v in changes.items()]
        sql = f"UPDATE batches SET {sets} WHERE id = ?"
        params.append(batch_id)
        if only_if_status is not None:
            statuses = tuple(only_if_status)
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            params.extend(statuses)
        cursor = await conn.execute(sql, params)
        return cursor.rowcount > 0

    async def checkpoint(self, batch_id: str, point: Checkpoint) -> None:
        await self.update_batch(
            batch_id,
            output_offset=point.output_offset,
            error_offset=point.error_offset,
            completed=point.completed,
            failed=point.failed,
            input_tokens=point.input_tokens,
            cached_tokens=point.cached_tokens,
            output_tokens=point.output_tokens,
            **point.extra,
        )

    async def finish_batch(self, batch_id: str, new_files: list[FileRow], **changes: Any) -> None:
        """Register the batch's result files and move it to its terminal status in one transaction."""
        async with self.transaction() as conn:
            for file in new_files:
                await self._insert_file(conn, file)
            await self._update_batch(conn, batch_id, None, changes)
