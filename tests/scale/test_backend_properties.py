"""A property test over backends: beside a healthy echo backend (a process), a fake backend answers what
hypothesis draws — status codes, bodies that are answers, error objects, other JSON, bytes, HTML, bodies cut
short, odd usage counts (NaN, strings, negatives, null, huge), dropped connections, delays and hangs past
`--backend-timeout`. Through a real server, whatever it answers: the batch completes with every custom_id
exactly once, no `status_code: 200` line whose body is not a chat completion, and `request_counts` equal to the
lines (engines/http.py, engines/router/)."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import chat_lines, read_jsonl, sdk, submit, wait_for
from tests.helpers.backends import Backend, echo
from tests.helpers.server import RunningServer, make_server

MODEL = "echo-model"
LINES = 10
MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()


def is_chat_completion(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("choices"), list) and "error" not in body


class Fake:
    """A backend on a raw socket, answering each POST with the next behaviour of its script (cycling)."""

    def __init__(self) -> None:
        fake = self
        self.script: list[dict[str, Any]] = [{"kind": "disconnect"}]
        self.count = 0
        self.total = 0  # over all examples
        self.lock = threading.Lock()
        self.stopping = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                fake.handle(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            if head.startswith(b"GET"):
                self.send(conn, 200, MODELS)
                return
            with self.lock:
                behaviour = self.script[self.count % len(self.script)]
                self.count += 1
                self.total += 1
            self.behave(conn, behaviour, json.loads(body))
        except (OSError, ValueError):
            return

    def behave(self, conn: socket.socket, behaviour: dict[str, Any], request: dict[str, Any]) -> None:
        kind = behaviour["kind"]
        if kind == "disconnect":
            return
        if kind == "hang":
            self.stopping.wait(3)
            return
        if behaviour.get("delay"):
            self.stopping.wait(behaviour["delay"])
        body: bytes = behaviour["body"]
        if kind == "answer":
            answer = {"id": "chatcmpl-fake", "object": "chat.completion", "model": request.get("model"),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake"},
                                   "finish_reason": "stop"}], "usage": {"placeholder": 0}}
            body = json.dumps(answer).replace('{"placeholder": 0}', behaviour["usage"]).encode()
        self.send(conn, behaviour["status"], body, cut=behaviour.get("cut", False),
                  extra=behaviour.get("headers", ""))

    @staticmethod
    def send(conn: socket.socket, status: int, body: bytes, cut: bool = False, extra: str = "") -> None:
        head = (f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n{extra}\r\n").encode()
        conn.sendall(head + (body[:len(body) // 2] if cut else body))

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


usages = st.sampled_from(['{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}',
                          '{"prompt_tokens": NaN, "completion_tokens": 1}', '{"prompt_tokens": "12"}',
                          '{"prompt_tokens": -4, "completion_tokens": null}', '{"prompt_tokens": 1e300}',
                          '{"prompt_tokens": 1180591620717411303424}', '"lots"', 'null', '[1, 2]',
                          '{"prompt_tokens_details": {"cached_tokens": Infinity}}'])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=10),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
bodies = (st.just(b"") | st.binary(max_size=40) | st.just(b"<html>502 Bad Gateway</html>")
          | json_values.map(lambda v: json.dumps(v).encode())
          | st.just(b'{"error": {"message": "overloaded", "type": "server_error", "code": null}}')
          | st.just(b'{"object": "list", "data": [{"embedding": [0.1]}]}')
          | st.just(b'{"error": {"message": "loading", "code": "model_not_loaded"}}'))
statuses = st.sampled_from([200, 200, 200, 200, 301, 400, 401, 404, 408, 413, 422, 429, 500, 502, 503, 504])
delays = st.sampled_from([0, 0, 0, 0.05, 0.3])
behaviours = st.one_of(
    st.fixed_dictionaries({"kind": st.just("answer"), "status": st.just(200), "usage": usages, "body": st.just(b""),
                           "delay": delays, "cut": st.booleans()}),
    st.fixed_dictionaries({"kind": st.just("raw"), "status": statuses, "body": bodies, "delay": delays,
                           "cut": st.booleans(),
                           "headers": st.sampled_from(["", "retry-after: 0.1\r\n", "retry-after: soon\r\n"])}),
    st.fixed_dictionaries({"kind": st.sampled_from(["disconnect", "hang"])}),
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Fake]]:
    directory = tmp_path_factory.mktemp("backend-properties")
    # A little slow, so that the fake (answering at once, or failing at once) gets its share.
    healthy: Backend = echo(directory / "backends", "healthy", "--delay", "0.1").start()
    fake = Fake()
    server = make_server(directory / "data", engine="http", extra_args=[
        "--backend-probe-seconds", "0.2", "--backend-timeout", "1",
        "--backend", healthy.url + ",window=4", "--backend", fake.url + ",window=4"]).start()
    try:
        yield server, fake
    finally:
        server.kill()
        fake.stop()
        healthy.kill()
    assert "unhandled error" not in server.log()


def test_whatever_a_backend_answers_every_request_has_one_honest_line(fleet: tuple[RunningServer, Fake]) -> None:
    """The property over 20 drawn scripts, then that the fake backend was reached by them, not only the healthy
    one (in one test: CI splits the suite by test, and a second test could run where this one did not)."""
    server, fake = fleet

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(script=st.lists(behaviours, min_size=1, max_size=6))
    def one_batch(script: list[dict[str, Any]]) -> None:
        fake.script, fake.count = script, 0
        client = sdk(server)
        prefix = f"p{time.monotonic_ns()}"
        batch = wait_for(client, submit(client, chat_lines(LINES, prefix=prefix)).id, timeout=120)
        assert batch.status == "completed", (batch, script)
        output, errors = read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)
        seen = sorted(line["custom_id"] for line in output + errors)
        assert seen == sorted(f"{prefix}-{i}" for i in range(LINES)), (seen, script)  # every custom_id once
        for line in output:
            response = line["response"]
            assert response["status_code"] == 200 and is_chat_completion(response["body"]), (line, script)
            json.dumps(response["body"], allow_nan=False)  # JSON that parses everywhere
        for line in errors:
            assert line["response"] is None or line["response"]["status_code"] != 200, (line, script)
            assert line["error"] is not None or line["response"]["body"].get("error"), (line, script)
        counts = batch.request_counts
        assert (counts.completed, counts.failed, counts.total) == (len(output), len(errors), LINES), (counts, script)

    one_batch()
    assert fake.total >= 40, fake.total  # the drawn scripts reached it, not only the healthy backend
