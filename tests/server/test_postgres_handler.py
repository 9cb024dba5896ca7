"""The `postgres` result handler against a real PostgreSQL server that the test starts (tests/helpers/postgres.py):
rows for every result, joined to their requests, exactly once even after kill -9 between a batch's end and the
delivery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ServerFactory, chat_lines, sdk, submit, wait_for
from tests.helpers import postgres
from tests.helpers.handlers import handler_flags, run_of, runs

DSN_ENV = "VB_TEST_RESULTS_DSN"


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.Postgres]:
    with postgres.running() as server:
        yield server


def rows(pg: postgres.Postgres, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(pg.dsn) as conn:
        cursor = conn.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def handler(table: str, **options: Any) -> list[str]:
    return handler_flags(pg={"type": "postgres", "dsn_env": DSN_ENV, "table": table, "backoff_seconds": 0.2,
                             "max_attempts": 100, **options})


def test_every_result_becomes_a_row_joined_to_its_request(pg: postgres.Postgres,
                                                         server_factory: ServerFactory) -> None:
    server = server_factory(env={DSN_ENV: pg.dsn}, extra_args=handler("results_a"))
    client = sdk(server)
    lines = chat_lines(25)
    lines[4]["body"]["messages"] = []  # a 400 answer
    lines[9]["body"]["messages"][0]["content"] = "nul \u0000 inside"  # jsonb cannot hold U+0000
    done = wait_for(client, submit(client, lines, metadata={"k": "v"}).id)
    run_of(server, done.id, "pg", "succeeded")

    found = rows(pg, "SELECT custom_id, line, endpoint, model, batch_status, status_code, request, response, error "
                     "FROM results_a WHERE batch_id = %s ORDER BY line", done.id)
    assert [r[0] for r in found] == [f"req-{i}" for i in range(25)]
    assert [r[1] for r in found] == list(range(1, 26))
    by_id = {r[0]: r for r in found}
    ok = by_id["req-0"]
    assert ok[2:6] == ("/v1/chat/completions", "echo-model", "completed", 200)
    assert ok[6] == lines[0]["body"]
    assert ok[7]["choices"][0]["message"]["content"] == "message number 0" and ok[8] is None
    failed = by_id["req-4"]
    assert failed[5] == 400 and failed[7] is None
    assert "messages" in failed[8]["message"]
    assert by_id["req-9"][7]["choices"][0]["message"]["content"] == "nul \ufffd inside"


def test_kill9_between_completion_and_delivery_leaves_each_row_once(pg: postgres.Postgres,
                                                                   server_factory: ServerFactory) -> None:
    """PostgreSQL is down when the batch ends, so delivery cannot happen; the batch server is killed -9 while its
    handler waits to retry; PostgreSQL comes back and the server restarts: the rows arrive, each once."""
    server = server_factory(env={DSN_ENV: pg.dsn}, extra_args=handler("results_b"))
    client = sdk(server)
    pg.stop("immediate")
    try:
        done = wait_for(client, submit(client, chat_lines(40)).id)
        waiting = run_of(server, done.id, "pg", "retrying")
        assert "connect" in waiting["last_error"].lower() or "connection" in waiting["last_error"].lower()
        server.kill()
    finally:
        pg.start()
    server.start()
    delivered = run_of(server, done.id, "pg", "succeeded")
    assert delivered["attempts"] >= 2
    counts = rows(pg, "SELECT count(*), count(DISTINCT custom_id) FROM results_b WHERE batch_id = %s", done.id)
    assert counts == [(40, 40)]

    # A delivery repeated for the same batch (at least once) replaces the rows: still once each.
    server.kill()
    _forget_delivery(server.data_dir, done.id)
    server.start()
    again = run_of(server, done.id, "pg", "succeeded")
    assert again["attempts"] == 1
    assert rows(pg, "SELECT count(*) FROM results_b WHERE batch_id = %s", done.id) == [(40,)]


def _forget_delivery(data_dir: Any, batch_id: str) -> None:
    """Mark the run pending again, as a crash right after the handler returned would have left it."""
    import sqlite3

    with sqlite3.connect(data_dir / "vllm-batch.sqlite3") as db:
        db.execute("UPDATE handler_runs SET status = 'pending', attempts = 0 WHERE batch_id = ?", (batch_id,))


def test_batches_ending_together_share_one_new_table(pg: postgres.Postgres, server_factory: ServerFactory) -> None:
    server = server_factory(env={DSN_ENV: pg.dsn}, extra_args=handler("results_c", concurrency=4))
    client = sdk(server)
    batches = [submit(client, chat_lines(5, prefix=f"b{i}")) for i in range(6)]
    for batch in batches:
        wait_for(client, batch.id)
    for batch in batches:
        run_of(server, batch.id, "pg", "succeeded")
        assert [r["attempts"] for r in runs(server, batch.id)] == [1]
    assert rows(pg, "SELECT count(DISTINCT batch_id), count(*) FROM results_c") == [(6, 30)]


def test_schema_qualified_table_and_the_stored_json(pg: postgres.Postgres, server_factory: ServerFactory) -> None:
    rows(pg, "CREATE SCHEMA IF NOT EXISTS llm")
    server = server_factory(env={DSN_ENV: pg.dsn}, extra_args=handler("llm.answers"))
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(2)).id)
    run_of(server, done.id, "pg", "succeeded")
    [(request, answer)] = rows(pg, "SELECT request->'messages'->0->>'content', response->'choices'->0->'message'->>"
                                   "'content' FROM llm.answers WHERE custom_id = 'req-1'")
    assert request == answer == "message number 1"
    assert json.dumps(rows(pg, "SELECT error FROM llm.answers WHERE custom_id = 'req-1'")) == "[[null]]"
