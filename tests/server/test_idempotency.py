"""Idempotency-Key on creates: a client that retries after losing the response gets the object it created, not
a second one; the same key with different content is refused; keys survive a crash."""

from __future__ import annotations

import threading
from typing import Any

import openai
import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, sdk, wait_for
from tests.hostile.errors import assert_openai_error


def create_file(client: openai.OpenAI, data: bytes, key: str | None, name: str = "in.jsonl") -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.files.create(file=(name, data), purpose="batch", extra_headers=headers)


def create_batch(client: openai.OpenAI, file_id: str, key: str | None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h", extra_headers=headers, **extra)


def test_a_repeated_upload_with_the_same_key_returns_the_same_file(client: openai.OpenAI) -> None:
    data = jsonl(chat_lines(3))
    first = create_file(client, data, "upload-key-1")
    again = create_file(client, data, "upload-key-1")
    assert again.id == first.id and again.bytes == first.bytes
    assert create_file(client, data, None).id != first.id  # no key: a new file each time
    assert create_file(client, data, "upload-key-2").id != first.id  # another key: another file


def test_a_reused_key_with_other_content_is_a_409(client: openai.OpenAI, shared_server: Any) -> None:
    create_file(client, jsonl(chat_lines(2)), "reused-key")
    response = shared_server.http.post(shared_server.base_url + "/files", headers={"Idempotency-Key": "reused-key"},
                          files={"file": ("in.jsonl", jsonl(chat_lines(3)))}, data={"purpose": "batch"})
    error = assert_openai_error(response, 409)
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert "reused-key" in error["message"]


def test_a_repeated_batch_create_with_the_same_key_returns_the_same_batch(client: openai.OpenAI) -> None:
    file_id = create_file(client, jsonl(chat_lines(3)), None).id
    first = create_batch(client, file_id, "batch-key-1", metadata={"job": "a"})
    again = create_batch(client, file_id, "batch-key-1", metadata={"job": "a"})
    assert again.id == first.id
    with pytest.raises(openai.ConflictError) as info:
        create_batch(client, file_id, "batch-key-1", metadata={"job": "b"})
    assert info.value.code == "idempotency_key_reused"
    # The same key on the other route is a different key.
    assert create_file(client, jsonl(chat_lines(1)), "batch-key-1").id.startswith("file-")


def test_a_malformed_key_is_refused(shared_server: Any) -> None:
    response = shared_server.http.post(shared_server.base_url + "/batches", headers={"Idempotency-Key": "k" * 300},
                          json={"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                                "completion_window": "24h"})
    error = assert_openai_error(response, 400)
    assert error["code"] == "invalid_idempotency_key"


def test_concurrent_creates_with_one_key_make_one_batch(client: openai.OpenAI) -> None:
    file_id = create_file(client, jsonl(chat_lines(3)), None).id
    ids: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            ids.append(create_batch(client, file_id, "race-key").id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(ids) == 8 and len(set(ids)) == 1
    assert sum(1 for b in client.batches.list(limit=100) if b.input_file_id == file_id) == 1


def test_keys_survive_a_kill(server_factory: ServerFactory) -> None:
    server = server_factory()
    client = sdk(server)
    data = jsonl(chat_lines(3))
    file_id = create_file(client, data, "durable-file").id
    batch_id = create_batch(client, file_id, "durable-batch").id
    server.kill()
    server.start()
    client = sdk(server)
    assert create_file(client, data, "durable-file").id == file_id
    assert create_batch(client, file_id, "durable-batch").id == batch_id
    assert len(client.batches.list().data) == 1


def test_a_deleted_file_frees_its_key(client: openai.OpenAI) -> None:
    data = jsonl(chat_lines(2))
    first = create_file(client, data, "deleted-key")
    client.files.delete(first.id)
    again = create_file(client, data, "deleted-key")
    assert again.id != first.id and client.files.retrieve(again.id).id == again.id


def test_a_batch_create_replayed_after_its_input_file_was_deleted_returns_the_batch(
        server_factory: ServerFactory) -> None:
    # The client lost the response, the batch ran and its input file was deleted, then the client retried: the
    # key answers before the (missing) input file is looked up, so the retry gets the batch, not a 404.
    client = sdk(server_factory())
    file_id = create_file(client, jsonl(chat_lines(2)), None).id
    first = create_batch(client, file_id, "replay-after-delete")
    assert wait_for(client, first.id).status == "completed"
    assert client.files.delete(file_id).deleted
    again = create_batch(client, file_id, "replay-after-delete")
    assert again.id == first.id and again.status == "completed"
    # Without the key, or with another content under it, the missing file still counts.
    with pytest.raises(openai.NotFoundError) as missing:
        create_batch(client, file_id, None)
    assert missing.value.code == "file_not_found"
    with pytest.raises(openai.ConflictError) as reused:
        create_batch(client, file_id, "replay-after-delete", metadata={"other": "content"})
    assert reused.value.code == "idempotency_key_reused"
    assert [b.id for b in client.batches.list()] == [first.id]
