"""The Batches API through the official openai SDK against a real server on loopback (echo engine)."""

from __future__ import annotations

import base64
import struct

import openai
import pytest

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


def test_chat_batch_runs_to_completed_with_every_timestamp(client: openai.OpenAI) -> None:
    lines = chat_lines(30)
    created = submit(client, lines, metadata={"purpose": "test"})
    assert created.status == "validating"
    assert created.metadata == {"purpose": "test"}
    assert created.expires_at == created.created_at + 24 * 3600

    batch = wait_for(client, created.id)

    assert batch.status == "completed"
    assert batch.model == "echo-model"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (30, 30, 0)
    stamps = [batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.completed_at]
    assert all(s is not None for s in stamps) and stamps == sorted(stamps)  # type: ignore[type-var]
    assert batch.failed_at is batch.cancelled_at is batch.expired_at is None
    assert batch.error_file_id is None
    output = read_jsonl(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    for line in output:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        number = line["custom_id"].split("-")[1]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"message number {number}"
    # usage adds up the per-request usage the engine reported
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
    assert batch.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens

    output_file = client.files.retrieve(batch.output_file_id)  # type: ignore[arg-type]
    assert output_file.purpose == "batch_output"
    assert output_file.bytes == len(client.files.content(output_file.id).content)


def test_completions_and_embeddings_endpoints(client: openai.OpenAI) -> None:
    completions = submit(client, [request_line(f"c{i}", f"word {i}", url="/v1/completions") for i in range(3)],
                         endpoint="/v1/completions")
    embeddings = submit(client, [request_line("e-float", "some text", url="/v1/embeddings", model="echo-embed"),
                                 request_line("e-b64", "some text", url="/v1/embeddings", model="echo-embed",
                                              encoding_format="base64")],
                        endpoint="/v1/embeddings")
    done = wait_for(client, completions.id)
    assert done.status == "completed"
    texts = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"]
             for o in read_jsonl(client, done.output_file_id)}
    assert texts == {"c0": "word 0", "c1": "word 1", "c2": "word 2"}

    done = wait_for(client, embeddings.id)
    assert done.status == "completed"
    bodies = {o["custom_id"]: o["response"]["body"] for o in read_jsonl(client, done.output_file_id)}
    floats = bodies["e-float"]["data"][0]["embedding"]
    packed = base64.b64decode(bodies["e-b64"]["data"][0]["embedding"])
    assert len(floats) == 384
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(floats, abs=1e-6)


def test_request_the_engine_rejects_becomes_an_error_line_and_the_batch_completes(client: openai.OpenAI) -> None:
    good = chat_lines(3)
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "echo-model", "messages": "not a list"}}
    batch = wait_for(client, submit(client, [*good, bad]).id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    [error] = read_jsonl(client, batch.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "messages"
    assert len(read_jsonl(client, batch.output_file_id)) == 3


def test_list_pagination_walks_every_batch_through_the_auto_pager(app_factory: AppFactory) -> None:
    client = sdk(app_factory())
    file_id = upload(client, jsonl(chat_lines(1)))
    created = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(25)]

    first = client.batches.list(limit=10)
    assert [b.id for b in first.data] == created[::-1][:10]  # newest first
    assert first.has_more is True
    walked = [b.id for b in client.batches.list(limit=7)]  # the SDK follows `after` page by page
    assert walked == created[::-1]
    last_page = client.batches.list(limit=10, after=created[5])
    assert [b.id for b in last_page.data] == created[4::-1]
    assert last_page.has_more is False


def test_cancel_mid_run_keeps_partial_results(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.05", "--window", "4", "--checkpoint-every", "5"])
    client = sdk(server)
    batch = submit(client, chat_lines(400))
    wait_for(client, batch.id, until=lambda b: b.request_counts and b.request_counts.completed >= 20)

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    done = wait_for(client, batch.id, timeout=2.0)  # the bound: cancelled within 2 s

    assert done.status == "cancelled"
    assert done.cancelled_at is not None and done.completed_at is None
    assert done.request_counts is not None
    output = read_jsonl(client, done.output_file_id)
    assert 20 <= len(output) < 400
    assert len(output) == done.request_counts.completed
    assert len({line["custom_id"] for line in output}) == len(output)
    # cancelling again is harmless; a finished batch cannot be cancelled
    assert client.batches.cancel(batch.id).status == "cancelled"
    finished = wait_for(client, submit(client, chat_lines(2)).id)
    with pytest.raises(openai.ConflictError) as caught:
        client.batches.cancel(finished.id)
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_cancel_before_it_runs(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.2", "--window", "1"])
    client = sdk(server)
    running = submit(client, chat_lines(50, "first"))
    queued = submit(client, chat_lines(5, "second"))
    wait_for(client, queued.id, statuses=("in_progress",))
    cancelled = wait_for(client, client.batches.cancel(queued.id).id)
    assert cancelled.status == "cancelled"
    assert cancelled.output_file_id is None and cancelled.error_file_id is None
    client.batches.cancel(running.id)


def test_expiry_keeps_completed_work_and_marks_the_rest(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.1", "--window", "2"])
    client = sdk(server)
    lines = chat_lines(200)
    batch = submit(client, lines, completion_window="2s")
    assert batch.completion_window == "2s"
    done = wait_for(client, batch.id, timeout=15)

    assert done.status == "expired"
    assert done.expired_at is not None and done.expired_at >= batch.expires_at
    output = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    assert output, "work finished before the deadline is kept"
    assert errors, "requests never run are reported"
    for line in errors:
        assert line["response"] is None
        assert line["error"]["code"] == "batch_expired"
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (len(output), len(errors))


def test_batches_of_different_models_queue_and_switch(client: openai.OpenAI) -> None:
    first = submit(client, chat_lines(20, "a"))
    second = submit(client, chat_lines(20, "b", model="echo-embed"))
    third = submit(client, chat_lines(20, "c"))
    for batch_id, model in ((first.id, "echo-model"), (second.id, "echo-embed"), (third.id, "echo-model")):
        done = wait_for(client, batch_id)
        assert done.status == "completed" and done.model == model
        assert {o["response"]["body"]["model"] for o in read_jsonl(client, done.output_file_id)} == {model}
