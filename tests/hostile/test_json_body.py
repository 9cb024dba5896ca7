"""JSON request bodies (POST /v1/batches) are read with a size limit and parsed strictly. Regression: a 400 MB body
was read whole (1.2 GB of server memory) before it was refused; NaN was accepted; a deeply nested body was "not
valid JSON"."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import Server
from tests.helpers import rawhttp
from tests.helpers.inprocess import InProcessServer, make_app
from tests.helpers.server import RunningServer, make_server
from tests.hostile.errors import assert_openai_error

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """The app in-process: what the parser refuses needs no socket."""
    app = make_app(tmp_path_factory.mktemp("json-body") / "data", extra_args=["--max-json-bytes", str(LIMIT)])
    yield app.start()
    app.stop()


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server process, for what is seen on the socket: an answer before the body is sent, a chunked body."""
    running = make_server(tmp_path_factory.mktemp("json-body-process") / "data",
                          extra_args=["--max-json-bytes", str(LIMIT)]).start()
    yield running
    running.kill()


def post(server: Server, raw: bytes) -> httpx.Response:
    return server.http.post(server.base_url + "/batches", content=raw, headers={"content-type": "application/json"},
                      timeout=30)


@pytest.mark.parametrize("raw", [b'{"metadata": {"a": NaN}}', b'{"x": Infinity}', b'{"x": -Infinity}',
                                 b'{"x": 1e999}', b'{"x": 1', b"\xff\xfe{}", b""])
def test_what_json_does_not_allow_is_refused(server: InProcessServer, raw: bytes) -> None:
    error = assert_openai_error(post(server, raw), 400)
    assert error["code"] == "invalid_json" and "not valid JSON" in error["message"]


def test_a_body_nested_too_deeply_says_so(server: InProcessServer) -> None:
    error = assert_openai_error(post(server, b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400)
    assert "nested" in error["message"] and "not valid JSON" not in error["message"]


def test_a_body_just_under_the_limit_is_read(server: InProcessServer) -> None:
    raw = b'{"input_file_id": "file-none", "padding": "' + b"x" * (LIMIT - 100) + b'"}'
    error = assert_openai_error(post(server, raw), 400)
    assert error["param"] == "padding"  # got past the size check to the fields


def test_an_oversize_body_is_refused_from_its_content_length_before_it_is_sent(process: RunningServer) -> None:
    server = process
    sock = rawhttp.connect(server.port)
    sock.sendall(f"POST /v1/batches HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {400 * 1024 * 1024}\r\n\r\n".encode())
    started = time.monotonic()
    response = rawhttp.read_response(sock, timeout=10)  # not a byte of the body sent
    sock.close()
    assert time.monotonic() - started < 5
    assert response.status == 413
    assert response.json()["error"]["code"] == "request_too_large" and str(LIMIT) in response.json()["error"][
        "message"]


def send_chunked_until_answered(port: int, total: int, chunk: int = 256 * 1024) -> tuple[int, bytes]:
    """Stream a chunked JSON body of up to `total` bytes, stopping as soon as the server answers; returns the bytes
    sent and what the server said."""
    sock = rawhttp.connect(port, timeout=60)
    sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    piece = f"{chunk:x}\r\n".encode() + b'{"a": "' + b"x" * (chunk - 7) + b"\r\n"
    sent = 0
    while sent < total:
        readable, writable, _ = select.select([sock], [sock], [], 30)
        if readable:
            break
        if writable:
            sock.sendall(piece)
            sent += chunk
    response = rawhttp.read_response(sock, timeout=30)
    sock.close()
    return sent, response.body if response.status == 413 else f"{response.status} {response.body!r}".encode()


def test_a_chunked_body_is_refused_once_it_crosses_the_limit(process: RunningServer) -> None:
    server = process
    sent, answer = send_chunked_until_answered(server.port, 64 * 1024 * 1024, chunk=16 * 1024)
    assert b"request_too_large" in answer, answer
    assert sent < 16 * 1024 * 1024  # answered long before the whole body was sent


def test_server_memory_stays_flat_on_a_huge_body(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the default limit (1 MiB): 400 MB offered, the server's RSS moves by a few MB at most."""
    running = make_server(tmp_path_factory.mktemp("json-memory") / "data").start()
    try:
        assert running.process is not None
        process = psutil.Process(running.process.pid)
        baseline = process.memory_info().rss
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            sent, answer = send_chunked_until_answered(running.port, 400 * 1024 * 1024)
        finally:
            done.set()
            sampler.join()
        assert b"request_too_large" in answer, answer
        assert sent < 64 * 1024 * 1024
        assert peak - baseline < 32 * 1024 * 1024, f"RSS grew by {(peak - baseline) / 2**20:.0f} MiB"
        assert httpx.get(running.root_url + "/health").status_code == 200
    finally:
        running.kill()
