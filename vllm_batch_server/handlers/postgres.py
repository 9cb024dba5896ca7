"""The `postgres` result handler: every result of an ended batch as a row of a PostgreSQL table.

Options: `dsn_env` (the environment variable holding the connection string, default `DATABASE_URL`; the
string itself never sits in the server's configuration), or `dsn`; `table` (default `batch_results`, may be
`schema.table`); `create_table` (default true).

One row per result, keyed by (batch_id, custom_id), joined to its request:

    batch_id, custom_id, line (1-based input line), endpoint, model, batch_status,
    status_code, request (the request body), response (the answer's body), error, delivered_at

A run is one transaction: the results and the requests are copied into temporary tables (COPY, streamed
from the files), joined by PostgreSQL, and upserted. A run repeated after a crash replaces the same rows, so
at-least-once delivery leaves each result exactly once in the table. PostgreSQL's jsonb cannot hold the
character U+0000; it is stored as U+FFFD.

Needs psycopg 3: `pip install "vllm-batch[postgres]"`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from vllm_batch_server.handlers import EndedBatch, HandlerConfigError
from vllm_batch_server.store.jsonl import iter_raw_lines

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
NUL_ESCAPE = b"\\u0000"


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


def _parse(raw: bytes) -> Any:
    value = json.loads(raw)
    return _without_nul(value) if NUL_ESCAPE in raw else value


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class PostgresHandler:
    def __init__(self, dsn_env: str = "DATABASE_URL", dsn: str | None = None, table: str = "batch_results",
                 create_table: bool = True, connect_timeout: float = 10.0) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise HandlerConfigError('needs psycopg 3: pip install "vllm-batch[postgres]"') from None
        parts = table.split(".") if isinstance(table, str) else []
        if not 1 <= len(parts) <= 2 or not all(IDENTIFIER.fullmatch(p) for p in parts):
            raise HandlerConfigError(f"'table' must be a plain SQL name (or schema.name), got {table!r}")
        if dsn is None and not os.environ.get(dsn_env):
            raise HandlerConfigError(f"the connection string is read from the environment variable {dsn_env}, "
                                     "which is not set (or give 'dsn_env')")
        self._dsn_env = dsn_env
        self._dsn = dsn
        self._table = parts
        self._create = bool(create_table)
        self._timeout = connect_timeout

    def handle(self, batch: EndedBatch) -> None:
        import psycopg
        from psycopg import sql

        dsn = self._dsn or os.environ.get(self._dsn_env)
        if not dsn:
            raise RuntimeError(f"the environment variable {self._dsn_env} is not set")
        table = sql.Identifier(*self._table)
        with psycopg.connect(dsn, connect_timeout=int(self._timeout)) as conn, conn.cursor() as cur:
            if self._create:
                # Two batches ending together would race to create the table; one waits for the other.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (".".join(self._table),))
                cur.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (batch_id text NOT NULL, custom_id text NOT NULL, line integer, "
                    "endpoint text NOT NULL, model text, batch_status text NOT NULL, status_code integer, "
                    "request jsonb, response jsonb, error jsonb, delivered_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (batch_id, custom_id))").format(table))
            cur.execute("CREATE TEMP TABLE vb_results (custom_id text PRIMARY KEY, status_code integer, "
                        "response jsonb, error jsonb) ON COMMIT DROP")
            with cur.copy("COPY vb_results FROM STDIN") as copy:
                for path in (batch.output_path, batch.error_path):
                    if path is None:
                        continue
                    for _, raw in iter_raw_lines(path):
                        copy.write_row(self._result_row(_parse(raw)))
            cur.execute("CREATE TEMP TABLE vb_requests (custom_id text PRIMARY KEY, line integer, request jsonb) "
                        "ON COMMIT DROP")
            if batch.input_path is not None:
                with cur.copy("COPY vb_requests FROM STDIN") as copy:
                    for number, raw in iter_raw_lines(batch.input_path):
                        line = _parse(raw)
                        copy.write_row((line["custom_id"], number, _json(line.get("body"))))
            cur.execute(sql.SQL(
                "INSERT INTO {} (batch_id, custom_id, line, endpoint, model, batch_status, status_code, request, "
                "response, error) SELECT %s, r.custom_id, q.line, %s, %s, %s, r.status_code, q.request, r.response, "
                "r.error FROM vb_results r LEFT JOIN vb_requests q USING (custom_id) "
                "ON CONFLICT (batch_id, custom_id) DO UPDATE SET line = excluded.line, endpoint = excluded.endpoint, "
                "model = excluded.model, batch_status = excluded.batch_status, status_code = excluded.status_code, "
                "request = excluded.request, response = excluded.response, error = excluded.error, "
                "delivered_at = now()").format(table),
                (batch.id, batch.endpoint, batch.model, batch.status))

    @staticmethod
    def _result_row(line: dict[str, Any]) -> tuple[Any, ...]:
        response = line.get("response")
        status = response.get("status_code") if isinstance(response, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        error = line.get("error")
        if status is not None and status != 200:
            # A non-200 answer: its body is the error (OpenAI's shape puts it under "error").
            error = (body.get("error") if isinstance(body, dict) else None) or error or body
            body = None
        return line["custom_id"], status, _json(body), _json(error)
