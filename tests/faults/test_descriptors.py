"""A server with few file descriptors (RLIMIT_NOFILE) under a flood of stalled uploads. Regression: with a limit
of 1024, 509 stalled uploads made the next batch fail with "Too many open files".

Two defences, each tested: by default the connection cap is sized from the descriptor limit, so stalled uploads
cannot take the descriptors a batch needs; and if descriptors do run out (a cap set too high by hand), a batch
that cannot open a file is paused, not failed, and resumes once the stalled uploads are cut off."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psutil

from tests.conftest import ServerFactory, chat_lines, jsonl
from tests.helpers import rawhttp
from tests.helpers.server import RunningServer

LINES = 300


def stall_uploads(server: RunningServer, count: int) -> list[socket.socket]:
    """`count` uploads that send their head and the first part of the file, then nothing."""
    head, body = rawhttp.upload_request(server.port, jsonl(chat_lines(50)))
    socks = []
    for _ in range(count):
        sock = rawhttp.connect(server.port)
        try:
            sock.sendall(head + body[:300])
        except OSError:
            pass  # refused and closed already
        socks.append(sock)
    return socks


@contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def run_batch(http: httpx.Client, data: bytes) -> str:
    file_id = http.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
    return str(http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"}).json()["id"])


def wait_done(http: httpx.Client, batch_id: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, object] = http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch['status']} after {timeout}s"
        time.sleep(0.1)


def output_ids(http: httpx.Client, batch: dict[str, object]) -> list[str]:
    content = http.get(f"/v1/files/{batch['output_file_id']}/content").text
    return sorted(line.split('"custom_id":"')[1].split('"')[0] for line in content.splitlines() if line)


def test_stalled_uploads_cannot_take_the_descriptors_a_batch_needs(server_factory: ServerFactory) -> None:
    nofile = 160  # the default cap becomes (160 - 128) / 2 = 16 connections
    server = server_factory(nofile=nofile, extra_args=["--echo-delay", "0.02", "--window", "4",
                                                       "--body-idle-timeout", "60", "--header-timeout", "60",
                                                       "--keep-alive-timeout", "60"])
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    # One kept-alive connection, opened first, to watch the batch through while the rest are stalled.
    with httpx.Client(base_url=server.root_url, timeout=30) as http:
        batch_id = run_batch(http, jsonl(chat_lines(LINES)))
        with closing_all(stall_uploads(server, 120)):
            peak = 0
            deadline = time.monotonic() + 60
            while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] not in ("completed", "failed"):
                peak = max(peak, process.num_fds())
                assert time.monotonic() < deadline, f"batch still {batch['status']} after 60s"
                time.sleep(0.05)
            assert batch["status"] == "completed", batch
            assert len(list((server.data_dir / "tmp").iterdir())) <= 16  # the stalled uploads within the cap
            assert peak < nofile
            refused = httpx.get(server.root_url + "/health", timeout=5)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
        assert output_ids(http, batch) == sorted(f"req-{i}" for i in range(LINES))
    assert "out of file descriptors" not in server.log_path.read_text()


def test_running_out_of_descriptors_pauses_a_batch_until_the_stalled_uploads_are_cut(
        server_factory: ServerFactory) -> None:
    nofile = 128
    server = server_factory(nofile=nofile, extra_args=["--max-connections", "1000", "--echo-delay", "0.005",
                                                       "--window", "4", "--body-idle-timeout", "3",
                                                       "--header-timeout", "60", "--keep-alive-timeout", "60"])
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    with httpx.Client(base_url=server.root_url, timeout=30) as http:
        data = jsonl(chat_lines(LINES))
        file_id = http.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
        with closing_all(stall_uploads(server, 70)):
            deadline = time.monotonic() + 10
            while process.num_fds() < nofile - 2:
                assert time.monotonic() < deadline, f"only {process.num_fds()} descriptors in use"
                time.sleep(0.05)
            # Every descriptor is taken: the batch is accepted (the database is open already), but cannot
            # open its input to validate it. It must wait, not fail.
            created = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                     "completion_window": "24h"})
            assert created.status_code in (200, 503), created.text
            if created.status_code == 503:  # even the insert ran out: say so, and take it once there is room
                assert created.json()["error"]["code"] == "server_overloaded"
                time.sleep(4)
                created = http.post("/v1/batches", json={"input_file_id": file_id,
                                                         "endpoint": "/v1/chat/completions",
                                                         "completion_window": "24h"})
            batch = wait_done(http, created.json()["id"], timeout=60)
    assert batch["status"] == "completed", batch
    with httpx.Client(base_url=server.root_url, timeout=30) as http:
        assert output_ids(http, batch) == sorted(f"req-{i}" for i in range(LINES))
    assert batch["errors"] is None and batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
    log = server.log_path.read_text()
    assert "could not validate batch" in log and "out of file descriptors" in log  # it did run out, and waited
    assert not list((server.data_dir / "tmp").iterdir())  # every stalled upload was cut off and removed
