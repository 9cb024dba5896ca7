"""Disk trouble: the data directory lives on a tiny tmpfs that fills up. Callers get a clear 507 in OpenAI's
error shape, nothing on disk is left torn or half-registered, and everything works again once space returns."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_lines, jsonl, request_line, sdk, submit, wait_for
from tests.faults.checks import assert_echo_answers, assert_exactly_once
from tests.helpers.disk import DISK_MB, fill, mounted_small_disk
from tests.helpers.server import RunningServer, make_server
from tests.hostile.errors import assert_openai_error


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_small_disk(tmp_path / "disk") as mount:
        yield mount


def upload(server_url: str, data: bytes, purpose: str = "batch") -> httpx.Response:
    return httpx.post(server_url + "/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose},
                      timeout=60)


def assert_no_upload_leftovers(data_dir: Path) -> None:
    assert list((data_dir / "tmp").iterdir()) == []


@pytest.fixture
def disk_server(small_disk: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """A server whose data directory is the small disk; its log stays outside, where there is space."""
    server = make_server(small_disk / "data", extra_args=["--echo-delay", "0.01", "--window", "4",
                                                          "--checkpoint-every", "10"])
    server.log_path = tmp_path / "server.log"
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_upload_larger_than_the_free_space_is_a_507(disk_server: RunningServer, small_disk: Path) -> None:
    response = upload(disk_server.base_url, b"x" * (DISK_MB + 1) * 1024 * 1024)
    error = assert_openai_error(response, 507) if response.status_code < 500 else None
    assert error is None
    assert response.status_code == 507, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "space" in body["message"].lower() and body["code"] == "insufficient_storage"
    assert_no_upload_leftovers(disk_server.data_dir)
    client = sdk(disk_server)
    assert client.files.list().data == []
    # the space was given back: a normal upload works
    assert client.files.create(file=("ok.jsonl", jsonl(chat_lines(3))), purpose="batch").bytes > 0


def test_full_disk_refuses_writes_cleanly_and_recovers(disk_server: RunningServer, small_disk: Path) -> None:
    client = sdk(disk_server)
    file_id = client.files.create(file=("in.jsonl", jsonl(chat_lines(5))), purpose="batch").id
    filler = fill(small_disk)
    try:
        refused = upload(disk_server.base_url, jsonl(chat_lines(50)))
        assert refused.status_code == 507, refused.text
        assert "space" in refused.json()["error"]["message"].lower()
        created = httpx.post(disk_server.base_url + "/batches", json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert created.status_code in (200, 507), created.text
        # reading still works
        assert client.files.retrieve(file_id).id == file_id
        assert client.batches.list().data is not None
        assert_no_upload_leftovers(disk_server.data_dir)
    finally:
        filler.unlink()
    batch = wait_for(client, submit(client, chat_lines(20)).id, timeout=30)
    assert batch.status == "completed"
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(20)})
    assert "Traceback" not in refused.text


def test_disk_filling_up_mid_batch_pauses_it_and_it_resumes(disk_server: RunningServer,
                                                            small_disk: Path) -> None:
    client = sdk(disk_server)
    n = 1500  # ~4 s of work: the disk fills long before the batch could finish
    batch_id = submit(client, chat_lines(n)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 50)
    filler = fill(small_disk)
    try:
        time.sleep(3)
        during = client.batches.retrieve(batch_id)
        assert during.status == "in_progress", during  # paused, not failed
        assert during.request_counts.completed < n
    finally:
        filler.unlink()
    assert "paused: out of disk space" in disk_server.log()
    done = wait_for(client, batch_id, timeout=60)
    assert done.status == "completed", done
    lines = assert_exactly_once(client, done, {f"req-{i}" for i in range(n)})
    assert_echo_answers(lines)


def test_disk_filling_up_mid_batch_never_duplicates_error_lines(disk_server: RunningServer,
                                                                 small_disk: Path) -> None:
    """Regression: a part whose write hit the full disk flushed its buffered lines later (when it was
    garbage-collected), behind the lines of the run that resumed the batch: error lines appeared twice."""
    client = sdk(disk_server)
    n = 1500
    # Every third request is refused by the engine (an empty conversation): both parts grow.
    lines = [request_line(f"req-{i}", f"message number {i}") if i % 3 else
             {**request_line(f"req-{i}"), "body": {"model": "echo-model", "messages": []}} for i in range(n)]
    batch_id = submit(client, lines).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 50)
    filler = fill(small_disk)
    try:
        time.sleep(3)
        assert client.batches.retrieve(batch_id).status == "in_progress"
    finally:
        filler.unlink()
    done = wait_for(client, batch_id, timeout=60)
    assert done.status == "completed", done
    lines_out = assert_exactly_once(client, done, {f"req-{i}" for i in range(n)})
    assert_echo_answers(lines_out)
    errors = [line for line in lines_out if line["response"]["status_code"] != 200]
    assert len(errors) == done.request_counts.failed == n // 3 + (n % 3 > 0)
