"""HTTP/1.1 over a bare socket, for clients no library will play: ones that send a request a byte at a time, stop
half-way through, or never send anything at all."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

BOUNDARY = "rawhttpb0undary"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload_request(port: int, data: bytes, *, purpose: str = "batch", filename: str = "input.jsonl",
                   headers: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """(request head, body) of a POST /v1/files multipart upload with a Content-Length, to send in pieces."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode()
    return head, body


def read_response(sock: socket.socket, timeout: float = 10.0) -> RawResponse:
    """Read one response (Content-Length or chunked); raises ConnectionError if the server closes first."""
    sock.settimeout(timeout)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response (got {buffer[:200]!r})")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return RawResponse(status, headers, rest[:length])
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body, rest = body + rest[:size], rest[size + 2:]
            if size == 0:
                return RawResponse(status, headers, body)
    return RawResponse(status, headers, rest)


def closed_by_peer(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed the connection (EOF or reset), or None if it is still open after
    `timeout`. Whatever the server sent before closing is read and dropped."""
    start = time.monotonic()
    deadline = start + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            return None
        except ConnectionError:
            return time.monotonic() - start
    return None
