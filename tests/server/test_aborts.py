"""Aborts we cause are never a request's result. When we stop requests in flight (a cancel, an expiry, a
graceful stop), the engine may answer each with an error of its own — vLLM's serving layer answers 400 "Client
disconnected", and the echo engine does the same — which was written to the error file as the request's
result: a cancelled batch read `19 completed, 81 failed` with 81 "Client disconnected" lines (issue 26).
An unrun request of a cancelled batch has no line; of an expired one, a `batch_expired` line; after a graceful
stop it runs again."""

from __future__ import annotations

from tests.conftest import ServerFactory, chat_lines, read_jsonl, sdk, submit, wait_for
from tests.faults.checks import assert_cancel_left_no_failure
from tests.helpers.server import make_server

DISCONNECTED = "Client disconnected"


def test_a_cancel_records_no_failure_for_the_requests_it_stopped(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.2", "--window", "8", "--checkpoint-seconds", "0.1"])
    client = sdk(server)
    lines = chat_lines(200)
    batch = submit(client, lines)
    wait_for(client, batch.id, until=lambda b: b.request_counts is not None and b.request_counts.completed >= 8)
    client.batches.cancel(batch.id)
    done = wait_for(client, batch.id, timeout=30)

    assert_cancel_left_no_failure(client, done, at_least=8, total=200)


def test_an_expiry_marks_the_requests_in_flight_batch_expired(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.1", "--window", "4"])
    client = sdk(server)
    lines = chat_lines(200)
    done = wait_for(client, submit(client, lines, completion_window="2s").id, timeout=15)

    assert done.status == "expired"
    errors = read_jsonl(client, done.error_file_id)
    assert errors and {line["error"]["code"] for line in errors if line["error"]} == {"batch_expired"}
    assert not [line for line in errors if line["response"] is not None], "no engine answer among the errors"
    assert DISCONNECTED not in str(errors)
    output = read_jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output + errors) == sorted(line["custom_id"] for line in lines)


def test_a_graceful_stop_mid_batch_leaves_no_failure_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = make_server(tmp_path / "data", extra_args=["--echo-delay", "0.1", "--window", "8",
                                                         "--checkpoint-seconds", "0.1"])
    server.start()
    try:
        client = sdk(server)
        batch = submit(client, chat_lines(200))
        wait_for(client, batch.id, until=lambda b: b.request_counts is not None and b.request_counts.completed >= 8)
        server.stop()  # SIGTERM: the requests in flight are aborted, and must run again after the restart
        server.start()
        done = wait_for(client, batch.id, timeout=60)
        output, errors = read_jsonl(client, done.output_file_id), read_jsonl(client, done.error_file_id)
    finally:
        server.kill()
    assert errors == []
    assert done.status == "completed"
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (200, 0)
    assert len(output) == 200
