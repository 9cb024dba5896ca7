"""kill -9 the real server at each stage of a batch's life; after a restart nothing accepted is lost.

Stages that take milliseconds (finalizing, the tail of a cancel) cannot be hit reliably by a kill from outside;
test_crash_in_process.py stops the scheduler at each of their steps instead.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, read_jsonl, request_line, sdk, submit, wait_for
from tests.faults.checks import assert_at_most_once, assert_echo_answers, assert_exactly_once


def db_status(data_dir: Path, batch_id: str) -> str:
    """The batch's status as committed on disk (read while the server is dead)."""
    with sqlite3.connect(data_dir / "vllm-batch.sqlite3") as conn:
        return str(conn.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])


def test_kill_during_upload_leaves_no_visible_file(server_factory: ServerFactory) -> None:
    server = server_factory()
    boundary = "crashboundary"
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
               "Content-Type: application/jsonl\r\n\r\n").encode()
        yield jsonl(chat_lines(2000))
        release.wait(30)  # the server has half the upload on disk when it is killed
        yield jsonl(chat_lines(10, prefix="tail")) + f"\r\n--{boundary}--\r\n".encode()

    outcome: list[Any] = []

    def send() -> None:
        try:
            outcome.append(httpx.post(server.base_url + "/files", content=body(), timeout=30,
                                      headers={"content-type": f"multipart/form-data; boundary={boundary}"}))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    tmp_dir = server.data_dir / "tmp"
    deadline = time.monotonic() + 20
    while not any(p.stat().st_size > 0 for p in tmp_dir.iterdir()):
        assert time.monotonic() < deadline, "the upload never reached the disk"
        time.sleep(0.01)
    server.kill()
    release.set()
    sender.join(30)
    assert isinstance(outcome[0], httpx.HTTPError), "a killed server cannot have acknowledged the upload"

    # A blob renamed into place whose row was never committed (a crash between the two) is orphaned too.
    (server.data_dir / "files" / "file-0rphan").write_bytes(b"never acknowledged")
    server.start()
    client = sdk(server)
    assert client.files.list().data == []
    assert list(tmp_dir.iterdir()) == []
    assert list((server.data_dir / "files").iterdir()) == []
    # and the server takes uploads again
    assert client.files.create(file=("ok.jsonl", jsonl(chat_lines(3))), purpose="batch").bytes > 0


def test_kill_during_validation_then_the_batch_still_runs_exactly_once(server_factory: ServerFactory) -> None:
    server = server_factory()
    client = sdk(server)
    n = 20_000  # validation of this many lines takes long enough to kill the server in the middle of it
    file_id = client.files.create(file=("big.jsonl", jsonl(chat_lines(n))), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    server.kill()
    assert db_status(server.data_dir, batch.id) == "validating"
    server.start()
    done = wait_for(client, batch.id, timeout=90)
    assert done.status == "completed", done
    assert_exactly_once(client, done, {f"req-{i}" for i in range(n)})
    # the acknowledged input file survived intact
    assert client.files.content(file_id).content == jsonl(chat_lines(n))


def mixed_lines(prefix: str, n: int) -> list[dict[str, Any]]:
    """Requests of which every seventh fails in the engine, so both result files are exercised."""
    lines = chat_lines(n, prefix=prefix)
    for i in range(0, n, 7):
        lines[i]["body"]["messages"] = []  # the echo engine answers 400: an error line
    return lines


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_at_random_points_in_progress(server_factory: ServerFactory, seed: int) -> None:
    rng = random.Random(seed)
    server = server_factory(extra_args=["--echo-delay", "0.03", "--window", "8", "--checkpoint-every", "7",
                                        "--checkpoint-seconds", "0.2"])
    client = sdk(server)
    sizes = {"a": 300, "b": 150, "c": 200}
    batches = {p: submit(client, mixed_lines(p, n)).id for p, n in sizes.items()}
    embeddings = [request_line(f"e-{i}", f"text {i}", model="echo-embed", url="/v1/embeddings")
                  for i in range(100)]
    batches["e"] = submit(client, embeddings, endpoint="/v1/embeddings").id
    sizes["e"] = 100
    kills_mid_run = 0  # kills that found some batch still running
    for _ in range(4):
        time.sleep(rng.uniform(0.05, 1.0))
        server.kill()
        statuses = {db_status(server.data_dir, b) for b in batches.values()}
        server.start()
        if statuses <= {"completed"}:
            break
        kills_mid_run += 1
    assert kills_mid_run >= 2
    for prefix, batch_id in batches.items():
        done = wait_for(client, batch_id, timeout=60)
        assert done.status == "completed", done
        lines = assert_exactly_once(client, done, {f"{prefix}-{i}" for i in range(sizes[prefix])})
        if prefix != "e":
            assert_echo_answers(lines)
            failed = {line["custom_id"] for line in read_jsonl(client, done.error_file_id)}
            assert failed == {f"{prefix}-{i}" for i in range(0, sizes[prefix], 7)}
            assert done.request_counts.failed == len(failed)


def test_kill_while_cancelling(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "4", "--checkpoint-every", "3"])
    client = sdk(server)
    batch_id = submit(client, mixed_lines("req", 400)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 20)
    client.batches.cancel(batch_id)
    server.kill()
    at_kill = db_status(server.data_dir, batch_id)
    assert at_kill in ("cancelling", "cancelled")
    server.start()
    done = wait_for(client, batch_id, timeout=30)
    assert done.status == "cancelled", done
    lines = assert_at_most_once(client, done, {f"req-{i}" for i in range(400)})
    assert 20 <= len(lines) < 400
    assert_echo_answers(lines)


@pytest.mark.parametrize("kill_at", [2.6, 3.4])
def test_kill_around_expiry(server_factory: ServerFactory, kill_at: float) -> None:
    """Killed just before or just after the completion window ends: the batch ends `expired` with every
    request accounted for exactly once, as a result or as a `batch_expired` line."""
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "2", "--checkpoint-every", "5"])
    client = sdk(server)
    started = time.monotonic()
    batch_id = submit(client, mixed_lines("req", 300), completion_window="3s").id  # ~8 s of work
    time.sleep(max(0.0, kill_at - (time.monotonic() - started)))
    server.kill()
    server.start()
    done = wait_for(client, batch_id, timeout=30)
    assert done.status == "expired", done
    lines = assert_exactly_once(client, done, {f"req-{i}" for i in range(300)})
    expired = [line for line in lines if line["error"] and line["error"]["code"] == "batch_expired"]
    assert 0 < len(expired) < 300
    assert_echo_answers(lines)


def test_graceful_stops_mid_batch_are_quick_and_resume_exactly_once(server_factory: ServerFactory) -> None:
    """SIGTERM (what a service manager sends first) while batches run: the server checkpoints and exits by
    itself, promptly, and the batches resume where they stopped."""
    server = server_factory(extra_args=["--echo-delay", "0.03", "--window", "8", "--checkpoint-every", "7"])
    client = sdk(server)
    batch_ids = [submit(client, mixed_lines(prefix, 600)).id for prefix in ("a", "b")]
    for pause in (0.4, 0.8, 0.3):  # ~4.5 s of work in all: every stop lands mid-run
        time.sleep(pause)
        assert server.process is not None
        started = time.monotonic()
        os.killpg(server.process.pid, signal.SIGTERM)
        # uvicorn ends a graceful stop by re-raising the SIGTERM it handled: -15, not -9
        assert server.process.wait(timeout=20) in (0, -signal.SIGTERM), "it must end by itself"
        assert time.monotonic() - started < 10
        server.process = None
        server.start()
    for prefix, batch_id in zip(("a", "b"), batch_ids, strict=True):
        done = wait_for(client, batch_id, timeout=60)
        assert done.status == "completed", done
        assert_echo_answers(assert_exactly_once(client, done, {f"{prefix}-{i}" for i in range(600)}))
