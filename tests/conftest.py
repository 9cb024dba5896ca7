"""Shared fixtures: the app in this process (the in-process tier) or real servers started as a user starts them
(the process tier), and the official openai SDK as the client.

Two tiers, one interface: `app_factory` and `server_factory` take the same arguments (CLI flags through
extra_args) and hand out objects with the same api_key, root_url, base_url, data_dir and http (an httpx client to
the server); `sdk(server)` gives the openai client for either. A test needs a process only for what the process
shows: kill -9 and restarts, signals, graceful stops, sockets, the CLI, the log file, the browser.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers.inprocess import InProcessServer, make_app
from tests.helpers.server import RunningServer, make_server

# The processes a test started, by name: when the test fails, their logs and exit codes go into its report (a
# server that died mid-test otherwise shows only as the client's "connection refused").
PROCESS_LOGS = pytest.StashKey[dict[str, Callable[[], str]]]()


def attach_log(request: pytest.FixtureRequest, name: str, describe: Callable[[], str]) -> None:
    request.node.stash.setdefault(PROCESS_LOGS, {})[name] = describe


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for name, describe in item.stash.get(PROCESS_LOGS, {}).items():
            report.sections.append((f"{name} (log tail)", describe()))
    return report

TERMINAL = ("completed", "failed", "expired", "cancelled")
ServerFactory = Callable[..., RunningServer]
AppFactory = Callable[..., InProcessServer]
Server = RunningServer | InProcessServer


@pytest.fixture
def server_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    """Start echo-engine servers (any CLI flags via extra_args); all are killed at teardown."""
    started: list[RunningServer] = []

    def start(name: str = "server", **kwargs: Any) -> RunningServer:
        server = make_server(tmp_path / name, **kwargs)
        started.append(server)
        attach_log(request, f"server {name}", server.describe)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def app_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AppFactory]:
    """Start the app in this process, with its lifespan (scheduler, engine, observers) running in a background
    thread; same arguments as server_factory (less port and nofile). All are stopped at teardown."""
    started: list[InProcessServer] = []

    def start(name: str = "server", **kwargs: Any) -> InProcessServer:
        app = make_app(tmp_path / name, **kwargs)
        started.append(app)
        attach_log(request, f"app {name}", app.describe)
        return app.start()

    yield start
    for app in reversed(started):
        app.stop()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """One echo app, in this process, for the tests that only read and write their own objects."""
    app = make_app(tmp_path_factory.mktemp("shared") / "data").start()
    yield app
    app.stop()


@pytest.fixture
def client(shared_server: InProcessServer) -> openai.OpenAI:
    return sdk(shared_server)


def sdk(server: Server, **kwargs: Any) -> openai.OpenAI:
    """The official openai client for a server of either tier."""
    if isinstance(server, InProcessServer):
        return server.openai(**kwargs)
    kwargs.setdefault("api_key", server.api_key or "unused")
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, **kwargs)


def request_line(custom_id: str, content: str = "hello there", *, model: str = "echo-model",
                 url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    if url == "/v1/embeddings":
        payload: dict[str, Any] = {"model": model, "input": content, **body}
    elif url == "/v1/completions":
        payload = {"model": model, "prompt": content, **body}
    else:
        payload = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": payload}


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_lines(n: int, prefix: str = "req", **kwargs: Any) -> list[dict[str, Any]]:
    return [request_line(f"{prefix}-{i}", f"message number {i}", **kwargs) for i in range(n)]


def upload(client: openai.OpenAI, data: bytes, name: str = "input.jsonl", purpose: str = "batch") -> str:
    return client.files.create(file=(name, data), purpose=purpose).id  # type: ignore[arg-type]


def submit(client: openai.OpenAI, lines: list[Any] | bytes, endpoint: str = "/v1/chat/completions",
           **kwargs: Any) -> Any:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.batches.create(input_file_id=upload(client, data), endpoint=endpoint,  # type: ignore[arg-type]
                                 completion_window=kwargs.pop("completion_window", "24h"), **kwargs)


SLOW_POLL_AFTER = 5.0  # seconds into a wait_for


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = TERMINAL,
             timeout: float = 60.0, until: Callable[[Any], bool] | None = None) -> Any:
    started = time.monotonic()
    deadline = started + timeout
    ends_only = until is None and set(statuses) <= set(TERMINAL)
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or (until is not None and until(batch)):
            return batch
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch}")
        # Twenty polls a second while the echo engine's batches take a second or less; four once a wait for an
        # end (a status that never changes again: none is missed by polling slower) is long, as through a real
        # model's load, which the polls (a request and a database read each) would slow on a 2-core machine. A
        # wait for a passing state (in_progress, a count) keeps polling fast: under load it can be brief.
        slow = ends_only and now - started >= SLOW_POLL_AFTER
        time.sleep(0.25 if slow else 0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]
