"""Retrying only the failed requests: POST /v1/batches/{id}/retry and POST /v1/batches/retry, against a real
server (echo engine with injected faults), parsed by the official SDK as a Batch."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types import Batch

from tests.conftest import (
    AppFactory,
    chat_lines,
    jsonl,
    read_jsonl,
    request_line,
    sdk,
    submit,
    upload,
    wait_for,
)
from tests.hostile.errors import assert_openai_error


def retry(client: openai.OpenAI, batch_id: str, **body: Any) -> Batch:
    return client.post(f"/batches/{batch_id}/retry", cast_to=Batch, body=body)


def ids_of(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


def test_a_batch_failed_by_the_engine_is_retried_with_only_its_unfinished_requests(
        app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-fault", "crash-after=40,times=1", "--engine-max-restarts", "0",
                                        "--echo-delay", "0.002", "--window", "2", "--checkpoint-every", "5"])
    client = sdk(server)
    lines = chat_lines(120)
    first = wait_for(client, submit(client, lines).id)
    assert first.status == "failed" and 0 < first.request_counts.completed < 120  # type: ignore[union-attr]
    done_first = set(ids_of(read_jsonl(client, first.output_file_id)))

    again = retry(client, first.id)
    assert again.status == "validating" and again.id != first.id
    assert again.metadata == {"retry_of": first.id}
    assert (again.endpoint, again.completion_window) == (first.endpoint, first.completion_window)
    sent = client.files.content(again.input_file_id).content
    expected = [line for line in lines if line["custom_id"] not in done_first]
    assert [json.loads(x) for x in sent.splitlines()] == expected  # the same lines, in input order
    assert client.files.retrieve(again.input_file_id).purpose == "batch"

    finished = wait_for(client, again.id)
    assert finished.status == "completed"
    assert finished.request_counts.total == len(expected)  # type: ignore[union-attr]
    done_again = ids_of(read_jsonl(client, finished.output_file_id))
    assert sorted(done_first | set(done_again)) == sorted(ids_of(lines))
    assert not done_first & set(done_again)


def test_error_lines_are_retried_and_a_success_in_any_retry_is_not_retried_again(
        app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.02", "--window", "2", "--sweep-seconds", "0.2"])
    client = sdk(server)
    lines = chat_lines(200)
    for broken in (3, 17):
        lines[broken]["body"]["messages"] = []  # answered 400 every time
    first = wait_for(client, submit(client, lines, completion_window="1s").id, timeout=60)
    assert first.status == "expired"
    failed_first = set(ids_of(read_jsonl(client, first.error_file_id)))
    assert {"req-3", "req-17"} <= failed_first and len(failed_first) > 2  # answered 400, or batch_expired

    second = wait_for(client, retry(client, first.id, completion_window="1h").id)
    assert second.completion_window == "1h"
    assert sorted(ids_of(read_jsonl(client, second.error_file_id))) == ["req-17", "req-3"]

    # Retrying the original with its retry: only what failed in both goes again, once each.
    third = client.post("/batches/retry", cast_to=Batch, body={"batch_ids": [first.id, second.id]})
    assert third.metadata == {"retry_of": f"{first.id},{second.id}"}
    sent = [json.loads(x) for x in client.files.content(third.input_file_id).content.splitlines()]
    assert ids_of(sent) == ["req-3", "req-17"]
    assert wait_for(client, third.id).request_counts.failed == 2  # type: ignore[union-attr]


def test_a_cancelled_batch_retries_what_never_ran(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.05", "--window", "2", "--checkpoint-every", "1"])
    client = sdk(server)
    batch = submit(client, chat_lines(200))
    wait_for(client, batch.id, until=lambda b: (b.request_counts.completed or 0) >= 4)
    client.batches.cancel(batch.id)
    cancelled = wait_for(client, batch.id)
    assert cancelled.status == "cancelled"
    done = set(ids_of(read_jsonl(client, cancelled.output_file_id)))
    again = wait_for(client, retry(client, batch.id, metadata={"run": "2"}).id, timeout=60)
    assert again.metadata == {"run": "2", "retry_of": batch.id}
    assert again.request_counts.total == 200 - len(done)  # type: ignore[union-attr]


def test_what_cannot_be_retried_is_refused_with_a_reason(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.05"])
    client = sdk(server)
    http = server.http_client(base_url=server.base_url)

    def refused(path: str, status: int, code: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = http.post(path, json=body) if body is not None else http.post(path)
        error = assert_openai_error(response, status)
        assert error["code"] == code, error
        return error

    complete = wait_for(client, submit(client, chat_lines(2)).id)
    refused(f"/batches/{complete.id}/retry", 409, "no_failed_requests")
    running = submit(client, chat_lines(100))
    refused(f"/batches/{running.id}/retry", 409, "batch_not_ended")
    client.batches.cancel(running.id)
    invalid = wait_for(client, submit(client, [request_line("a", model="not-served")]).id)
    assert invalid.status == "failed"
    refused(f"/batches/{invalid.id}/retry", 409, "batch_not_retryable")
    refused("/batches/batch_doesnotexist/retry", 404, "batch_not_found")
    assert refused("/batches/retry", 404, "batch_not_found", {"batch_ids": [complete.id, "batch_nope"]})["param"] == \
        "batch_ids"

    embed = wait_for(client, submit(client, [request_line("e", model="echo-embed", url="/v1/embeddings")],
                                    endpoint="/v1/embeddings").id)
    refused("/batches/retry", 400, "mismatched_batches", {"batch_ids": [complete.id, embed.id]})
    assert refused("/batches/retry", 400, "missing_required_parameter", {})["param"] == "batch_ids"
    refused("/batches/retry", 400, "invalid_value", {"batch_ids": "batch_x"})
    refused("/batches/retry", 400, "invalid_value", {"batch_ids": [complete.id, complete.id]})
    refused("/batches/retry", 400, "invalid_value", {"batch_ids": [f"batch_{i}" for i in range(17)]})
    refused(f"/batches/{complete.id}/retry", 400, "unknown_parameter", {"endpoint": "/v1/embeddings"})
    refused(f"/batches/{complete.id}/retry", 400, "invalid_value", {"completion_window": "soon"})
    refused(f"/batches/{complete.id}/retry", 400, "invalid_value", {"metadata": {"retry_of": "x"}})
    bad_json = http.post(f"/batches/{complete.id}/retry", content=b"{not json")
    assert assert_openai_error(bad_json, 400)["code"] == "invalid_json"

    # The input was deleted once the batch ended: its requests cannot be sent again.
    lines = chat_lines(3)
    lines[0]["body"]["messages"] = []
    failed_one = wait_for(client, submit(client, lines).id)
    client.files.delete(failed_one.input_file_id)
    refused(f"/batches/{failed_one.id}/retry", 409, "input_file_deleted")


def test_an_idempotency_key_replays_the_same_retry(app_factory: AppFactory) -> None:
    server = app_factory()
    client = sdk(server)
    lines = chat_lines(4)
    lines[1]["body"]["messages"] = []
    done = wait_for(client, submit(client, lines).id)
    key = {"Idempotency-Key": "retry-once"}
    first = client.post(f"/batches/{done.id}/retry", cast_to=Batch, body={}, options={"headers": key})
    second = client.post(f"/batches/{done.id}/retry", cast_to=Batch, body={}, options={"headers": key})
    assert first.id == second.id
    with pytest.raises(openai.ConflictError):
        client.post(f"/batches/{done.id}/retry", cast_to=Batch, body={"metadata": {"x": "y"}},
                    options={"headers": key})
    retries = [b for b in client.batches.list(limit=100).data if (b.metadata or {}).get("retry_of") == done.id]
    assert [b.id for b in retries] == [first.id]


def test_a_retry_file_is_an_ordinary_batch_input(app_factory: AppFactory) -> None:
    """The file the retry made can be used to create a batch by hand, and deleted once unused."""
    server = app_factory()
    client = sdk(server)
    lines = chat_lines(3)
    lines[2]["body"]["messages"] = []
    done = wait_for(client, submit(client, lines).id)
    again = wait_for(client, retry(client, done.id).id)
    by_hand = client.batches.create(input_file_id=again.input_file_id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    assert wait_for(client, by_hand.id).request_counts.total == 1  # type: ignore[union-attr]
    assert client.files.delete(again.input_file_id).deleted
    assert upload(client, jsonl(lines))  # the server is fine


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "file:///etc/passwd", "not a url"])
def test_a_retry_refuses_a_webhook_url_as_create_does(client: openai.OpenAI, url: str) -> None:
    lines = chat_lines(2)
    lines[0]["body"]["messages"] = []  # an error line: something to retry
    failed_one = wait_for(client, submit(client, lines).id)
    metadata = {"webhook_url": url}
    with pytest.raises(openai.BadRequestError) as created:
        client.batches.create(input_file_id=failed_one.input_file_id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata=metadata)
    for path, body in ((f"/batches/{failed_one.id}/retry", {"metadata": metadata}),
                       ("/batches/retry", {"batch_ids": [failed_one.id], "metadata": metadata})):
        with pytest.raises(openai.BadRequestError) as retried:
            client.post(path, cast_to=Batch, body=body)
        assert retried.value.body == created.value.body  # type: ignore[comparison-overlap]
        assert retried.value.body["code"] == "webhook_url_not_allowed"  # type: ignore[index]
