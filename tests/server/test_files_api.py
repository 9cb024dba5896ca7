"""The Files API through the official openai SDK against a real server."""

from __future__ import annotations

import socket
import time

import openai
import pytest

from tests.conftest import AppFactory, ServerFactory, chat_lines, jsonl, sdk, submit, wait_for


def test_upload_retrieve_download_delete(client: openai.OpenAI) -> None:
    data = jsonl(chat_lines(5))
    before = int(time.time())
    created = client.files.create(file=("my-input.jsonl", data), purpose="batch")
    assert created.object == "file"
    assert created.id.startswith("file-")
    assert created.bytes == len(data)
    assert created.filename == "my-input.jsonl"
    assert created.purpose == "batch"
    assert created.status == "processed"
    assert created.expires_at is None
    assert before <= created.created_at <= int(time.time())

    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(created.id)
    assert caught.value.code == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)


def test_binary_content_round_trips_byte_for_byte(client: openai.OpenAI) -> None:
    data = bytes(range(256)) * 4096 + b"\r\n--boundary-lookalike--\r\n"  # 1 MiB of every byte value
    created = client.files.create(file=("blob.bin", data), purpose="user_data")
    assert client.files.content(created.id).content == data


def test_expires_after_sets_expires_at(client: openai.OpenAI) -> None:
    created = client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch",
                                  expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 10})
    assert caught.value.body["param"] == "expires_after.seconds"  # type: ignore[index]


def test_list_files_orders_filters_and_pages(app_factory: AppFactory) -> None:
    client = sdk(app_factory())
    batch_ids = [client.files.create(file=(f"b{i}.jsonl", b"{}\n"), purpose="batch").id for i in range(5)]
    user_ids = [client.files.create(file=(f"u{i}.txt", b"x"), purpose="user_data").id for i in range(3)]

    newest_first = [f.id for f in client.files.list()]
    assert newest_first == (batch_ids + user_ids)[::-1]
    assert [f.id for f in client.files.list(order="asc")] == batch_ids + user_ids
    assert [f.id for f in client.files.list(purpose="user_data")] == user_ids[::-1]

    page = client.files.list(limit=3, order="asc")
    assert [f.id for f in page.data] == batch_ids[:3]
    assert page.has_more is True
    assert [f.id for f in client.files.list(limit=2, order="asc")] == batch_ids + user_ids  # auto-pager
    rest = client.files.list(limit=100, order="asc", after=user_ids[0])
    assert [f.id for f in rest.data] == user_ids[1:]
    assert rest.has_more is False


def test_oversize_upload_is_refused_with_413_and_leaves_nothing(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--max-file-bytes", "2000"])
    client = sdk(server)
    client.files.create(file=("ok.jsonl", b"x" * 2000), purpose="batch")
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * 2001), purpose="batch")
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "file_too_large"  # type: ignore[index]
    assert caught.value.response.headers["x-should-retry"] == "false"
    # declared far too large: refused before the body is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: multipart/form-data; boundary=abc\r\n"
                     b"Content-Length: 52428800\r\n\r\n--abc\r\n")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 413 ")  # the reason phrase differs by Python version
    assert len(client.files.list().data) == 1
    assert not any((server.data_dir / "tmp").iterdir())


def test_a_file_used_by_an_active_batch_cannot_be_deleted(app_factory: AppFactory) -> None:
    client = sdk(app_factory(extra_args=["--echo-delay", "0.05", "--window", "1"]))
    batch = submit(client, chat_lines(40))
    with pytest.raises(openai.ConflictError) as caught:
        client.files.delete(batch.input_file_id)
    assert caught.value.code == "file_in_use"
    assert caught.value.response.headers["x-should-retry"] == "false"
    wait_for(client, client.batches.cancel(batch.id).id)
    assert client.files.delete(batch.input_file_id).deleted is True
