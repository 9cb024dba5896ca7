"""Slow and silent clients against a real server, over bare sockets. Regression: 200 uploads sending a byte a
second, 100 half-sent requests and 100 connections that sent nothing were all still held after 75 s (611
descriptors, 200 temporary files); nothing ever timed out but a kept-alive connection after a response."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, sdk
from tests.helpers import rawhttp
from tests.helpers.server import RunningServer, make_server
from tests.hostile.errors import assert_openai_error

HEADER_TIMEOUT = 1.0
BODY_IDLE_TIMEOUT = 2.0
KEEP_ALIVE_TIMEOUT = 1.0
SLACK = 2.0  # scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = make_server(tmp_path_factory.mktemp("slow") / "data", extra_args=[
        "--header-timeout", str(HEADER_TIMEOUT), "--body-idle-timeout", str(BODY_IDLE_TIMEOUT),
        "--keep-alive-timeout", str(KEEP_ALIVE_TIMEOUT)]).start()
    yield running
    running.kill()


def tmp_files(server: RunningServer) -> list[str]:
    return [p.name for p in (server.data_dir / "tmp").iterdir()]


def test_connections_that_send_nothing_are_closed_after_the_header_timeout(server: RunningServer) -> None:
    socks = [rawhttp.connect(server.port) for _ in range(20)]
    waited = [rawhttp.closed_by_peer(sock, HEADER_TIMEOUT + SLACK) for sock in socks]
    for sock in socks:
        sock.close()
    assert all(w is not None for w in waited), waited
    assert httpx.get(server.root_url + "/health").status_code == 200


def test_slowloris_headers_are_cut_off_after_the_header_timeout(server: RunningServer) -> None:
    """A byte of header every 0.2 s: always making progress, never finishing. The deadline is for the whole
    head, so it is cut off (with a 408) all the same."""
    socks = [rawhttp.connect(server.port) for _ in range(20)]
    for sock in socks:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    started = time.monotonic()
    open_socks = set(socks)
    answers: dict[socket.socket, bytes] = {}
    while open_socks and time.monotonic() - started < HEADER_TIMEOUT + SLACK:
        for sock in list(open_socks):
            try:
                sock.sendall(b"a")
                sock.settimeout(0.01)
                data = sock.recv(65536)
                answers[sock] = answers.get(sock, b"") + data
                if not data:
                    open_socks.discard(sock)
            except TimeoutError:
                pass
            except OSError:
                open_socks.discard(sock)
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    for sock in socks:
        sock.close()
    assert not open_socks, f"{len(open_socks)} slow header senders still connected after {elapsed:.1f}s"
    assert elapsed >= HEADER_TIMEOUT * 0.9
    timed_out = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408")]
    assert timed_out and all(b'"code": "request_timeout"' in a for a in timed_out), answers


def test_headers_larger_than_the_limit_are_refused(server: RunningServer) -> None:
    sock = rawhttp.connect(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    try:
        for _ in range(64):
            sock.sendall(b"X-Big: " + b"a" * 4096 + b"\r\n")
    except OSError:
        pass  # closed on us mid-way: the point
    response = rawhttp.read_response(sock)
    sock.close()
    assert response.status == 431 and response.json()["error"]["code"] == "headers_too_large"


def test_idle_keep_alive_connections_are_closed(server: RunningServer) -> None:
    sock = rawhttp.connect(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert rawhttp.read_response(sock).status == 200
    waited = rawhttp.closed_by_peer(sock, KEEP_ALIVE_TIMEOUT + SLACK)
    sock.close()
    assert waited is not None and waited >= KEEP_ALIVE_TIMEOUT * 0.9


def test_a_second_request_on_a_kept_alive_connection_has_its_own_header_deadline(server: RunningServer) -> None:
    sock = rawhttp.connect(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert rawhttp.read_response(sock).status == 200
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the end of the head
    response = rawhttp.read_response(sock, timeout=HEADER_TIMEOUT + SLACK)
    sock.close()
    assert response.status == 408


def test_a_stalled_upload_is_cut_off_after_the_idle_timeout_and_leaves_no_temp_file(server: RunningServer) -> None:
    before = {f.id for f in sdk(server).files.list()}
    head, body = rawhttp.upload_request(server.port, jsonl(chat_lines(500)))
    sock = rawhttp.connect(server.port)
    sock.sendall(head + body[: len(body) // 2])
    deadline = time.monotonic() + 5
    while not tmp_files(server):
        assert time.monotonic() < deadline, "the upload never reached the upload area"
        time.sleep(0.02)
    started = time.monotonic()
    response = rawhttp.read_response(sock, timeout=BODY_IDLE_TIMEOUT + SLACK)
    waited = time.monotonic() - started
    assert response.status == 408, response.body
    error = response.json()["error"]
    assert error["code"] == "request_timeout" and f"{BODY_IDLE_TIMEOUT:g} seconds" in error["message"]
    assert response.headers.get("connection") == "close"
    assert waited >= BODY_IDLE_TIMEOUT * 0.8
    assert tmp_files(server) == []  # removed before the answer was sent
    assert rawhttp.closed_by_peer(sock, 2) is not None
    sock.close()
    assert {f.id for f in sdk(server).files.list()} == before


def test_a_slow_upload_that_keeps_making_progress_succeeds(server: RunningServer) -> None:
    """A chunk every 0.5 s, with a 2 s idle timeout, for 5 s in all: never silent long enough to be cut off."""
    payload = jsonl(chat_lines(200))
    head, body = rawhttp.upload_request(server.port, payload)
    sock = rawhttp.connect(server.port)
    sock.sendall(head)
    pieces = 10
    size = len(body) // pieces + 1
    started = time.monotonic()
    for i in range(pieces):
        time.sleep(0.5)
        sock.sendall(body[i * size:(i + 1) * size])
    response = rawhttp.read_response(sock)
    sock.close()
    assert time.monotonic() - started > 2 * BODY_IDLE_TIMEOUT
    assert response.status == 200, response.body
    assert sdk(server).files.content(response.json()["id"]).content == payload


def test_a_stalled_json_body_is_cut_off_too(server: RunningServer) -> None:
    sock = rawhttp.connect(server.port)
    sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"input_file_id\": ")
    response = rawhttp.read_response(sock, timeout=BODY_IDLE_TIMEOUT + SLACK)
    sock.close()
    assert response.status == 408 and response.json()["error"]["code"] == "request_timeout"


def test_the_drain_after_an_early_answer_is_bounded(server: RunningServer) -> None:
    """A request answered before its body was read (here: an unknown route) keeps being drained, so the client
    sees the answer; if the client then goes silent mid-body, the connection is closed."""
    sock = rawhttp.connect(server.port)
    sock.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    assert rawhttp.read_response(sock).status == 404
    sock.sendall(b"x" * 1000)  # keeps sending a little after the answer, then stops
    waited = rawhttp.closed_by_peer(sock, BODY_IDLE_TIMEOUT + KEEP_ALIVE_TIMEOUT + SLACK)
    sock.close()
    assert waited is not None


def test_connections_past_the_cap_are_refused_promptly_and_the_server_stays_healthy(
        server_factory: ServerFactory) -> None:
    cap = 8
    running = server_factory(extra_args=["--max-connections", str(cap), "--header-timeout", "30"])
    held = [rawhttp.connect(running.port) for _ in range(cap)]
    time.sleep(0.2)
    try:
        started = time.monotonic()
        refused = httpx.get(running.root_url + "/health", timeout=10)
        assert time.monotonic() - started < 1.5
        error = assert_openai_error(refused, 503) if refused.status_code < 500 else refused.json()["error"]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert error["code"] == "too_many_connections" and str(cap) in error["message"]
        for _ in range(20):  # a burst of them, each answered at once
            assert httpx.get(running.root_url + "/health", timeout=5).status_code == 503
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(running.root_url + "/health", timeout=5).status_code == 200
    client = sdk(running)
    assert client.files.create(file=("a.jsonl", jsonl(chat_lines(2))), purpose="batch").bytes > 0


def test_the_sdk_retries_past_a_full_server(server_factory: ServerFactory) -> None:
    """503 with Retry-After is what the official SDK retries: once a slot frees up, the call goes through."""
    running = server_factory(extra_args=["--max-connections", "2", "--header-timeout", "30"])
    held = [rawhttp.connect(running.port) for _ in range(2)]
    time.sleep(0.2)
    threading.Timer(1.5, lambda: [s.close() for s in held]).start()
    assert sdk(running, max_retries=5).models.list().data  # retried past the 503s


@pytest.fixture(scope="module")
def big_file(server: RunningServer) -> tuple[str, int]:
    data = b"x" * (32 * 1024 * 1024)
    response = httpx.post(server.base_url + "/files", files={"file": ("big.jsonl", data)},
                          data={"purpose": "user_data"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["id"], len(data)


def download(server: RunningServer, file_id: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a small window, so the server's buffer fills
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return sock


def read_all(sock: socket.socket, pause: float = 0.0, piece: int = 512 * 1024) -> int:
    received = 0
    sock.settimeout(10)
    while True:
        got = 0
        while got < piece:
            try:
                chunk = sock.recv(65536)
            except ConnectionError:
                return received
            if not chunk:
                return received
            got += len(chunk)
            received += len(chunk)
        time.sleep(pause)


def test_a_response_the_client_stops_reading_is_abandoned(server: RunningServer, big_file: tuple[str, int]) -> None:
    file_id, size = big_file
    sock = download(server, file_id)
    port = sock.getsockname()[1]
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    time.sleep(BODY_IDLE_TIMEOUT + SLACK)
    # Gone on the server's side while the client still has not read a byte (the descriptor is free)...
    assert not [c for c in process.net_connections() if c.raddr and c.raddr.port == port]
    received = read_all(sock)  # ...and the client got what was buffered before the server gave up
    sock.close()
    assert received < size


def test_a_slow_reader_that_keeps_reading_gets_the_whole_response(server: RunningServer,
                                                                   big_file: tuple[str, int]) -> None:
    file_id, size = big_file
    sock = download(server, file_id)
    started = time.monotonic()
    received = read_all(sock, pause=0.1, piece=1024 * 1024)  # ~10 MB/s with pauses: over 3 s in all
    sock.close()
    assert time.monotonic() - started > BODY_IDLE_TIMEOUT
    assert received > size  # the whole body plus the head
