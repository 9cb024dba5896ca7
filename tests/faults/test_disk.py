"""Disk trouble: the data directory lives on a tiny tmpfs that fills up. Callers get a clear 507 in OpenAI's
error shape, nothing on disk is left torn or half-registered, and everything works again once space returns."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_lines, jsonl, sdk, submit, wait_for
from tests.faults.checks import assert_echo_answers, assert_exactly_once
from tests.helpers.server import RunningServer, make_server
from tests.hostile.errors import assert_openai_error

DISK_MB = 6


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; deleting the returned file gives the space back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: a short write tells exactly when it is full
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while fh.write(b"\0" * size):
                    pass
    return filler


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
