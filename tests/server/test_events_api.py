"""GET /v1/events and its server-sent event stream, against a real server (echo engine); the stream's ending on
disconnect and shutdown on the real EventLog in process."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import AppFactory, Server, ServerFactory, chat_lines, sdk, submit, wait_for
from tests.helpers.server import RunningServer
from vllm_batch_server.api.events import EventStream
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.database import BatchRow, Database
from vllm_batch_server.store.events import EventLog
from vllm_batch_server.store.lifecycle import Lifecycle

LIFE = ["batch.created", "batch.in_progress", "batch.finalizing", "batch.completed"]


def events(server: Server, **params: Any) -> dict[str, Any]:
    response = server.http.get(server.root_url + "/v1/events", params=params, headers=auth(server))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def auth(server: Server) -> dict[str, str]:
    return {"authorization": f"Bearer {server.api_key}"} if server.api_key else {}


def sse_messages(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Parse server-sent events as a browser does: fields until a blank line."""
    message: dict[str, str] = {}
    for line in lines:
        if line == "":
            if message:
                yield message
            message = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            message[name] = value[1:] if value.startswith(" ") else value


def read_stream(server: RunningServer, until: int, headers: dict[str, str] | None = None,
                params: dict[str, Any] | None = None, timeout: float = 30) -> list[dict[str, str]]:
    got: list[dict[str, str]] = []
    with httpx.stream("GET", server.root_url + "/v1/events/stream", params=params,
                      headers={**auth(server), **(headers or {})}, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in sse_messages(response.iter_lines()):
            got.append(message)
            if sum(1 for m in got if "data" in m) >= until:
                break
    return got


@pytest.fixture
def server(server_factory: ServerFactory) -> RunningServer:
    return server_factory()


def test_the_log_lists_every_status_change_in_order(app_factory: AppFactory) -> None:
    server = app_factory()
    client = sdk(server)
    first = wait_for(client, submit(client, chat_lines(3)).id)
    second = wait_for(client, submit(client, chat_lines(2)).id)

    page = events(server)
    assert page["object"] == "list" and page["has_more"] is False
    data = page["data"]
    assert [e["type"] for e in data if e["data"]["id"] == first.id] == LIFE
    assert [e["type"] for e in data if e["data"]["id"] == second.id] == LIFE
    seqs = [e["seq"] for e in data]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 8
    event = data[0]
    assert set(event) == {"object", "id", "seq", "type", "created_at", "data"}
    assert event["object"] == "event" and event["id"].startswith("evt_") and event["data"] == {"id": first.id}
    assert event["created_at"] == first.created_at
    assert (page["first_id"], page["last_id"]) == (data[0]["id"], data[-1]["id"])

    # Paging by seq, and one batch's own history.
    head = events(server, limit=3)
    assert head["has_more"] is True and [e["seq"] for e in head["data"]] == seqs[:3]
    rest = events(server, after=head["data"][-1]["seq"])
    assert [e["seq"] for e in rest["data"]] == seqs[3:]
    assert events(server, after=seqs[-1])["data"] == []
    mine = events(server, batch_id=second.id)["data"]
    assert [e["type"] for e in mine] == LIFE and {e["data"]["id"] for e in mine} == {second.id}


@pytest.mark.parametrize("params,param", [({"after": "-1"}, "after"), ({"after": "x"}, "after"),
                                          ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
                                          ({"batch_id": "../etc"}, "batch_id")])
def test_bad_parameters_are_named(app_factory: AppFactory, params: dict[str, str], param: str) -> None:
    server = app_factory()
    response = server.http.get(server.root_url + "/v1/events", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_the_stream_sends_what_happens_from_now_on(server: RunningServer) -> None:
    client = sdk(server)
    old = wait_for(client, submit(client, chat_lines(2)).id)
    got: list[dict[str, str]] = []
    reader = threading.Thread(target=lambda: got.extend(read_stream(server, until=4)))
    reader.start()
    time.sleep(0.5)  # connected: the stream starts at the end of the log
    new = wait_for(client, submit(client, chat_lines(2)).id)
    reader.join(30)
    assert not reader.is_alive()

    assert got[0] == {"retry": "2000"}
    messages = [m for m in got if "data" in m]
    bodies = [json.loads(m["data"]) for m in messages]
    assert [b["data"]["id"] for b in bodies] == [new.id] * 4 != [old.id] * 4
    assert [m["event"] for m in messages] == [b["type"] for b in bodies] == LIFE
    assert [m["id"] for m in messages] == [str(b["seq"]) for b in bodies]


def test_the_stream_resumes_after_last_event_id_and_after(server: RunningServer) -> None:
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(2)).id)
    log = events(server)["data"]
    assert len(log) == 4

    resume = {"last-event-id": str(log[1]["seq"])}
    resumed = [json.loads(m["data"]) for m in read_stream(server, until=2, headers=resume) if "data" in m]
    assert [e["id"] for e in resumed] == [log[2]["id"], log[3]["id"]]
    from_start = [json.loads(m["data"]) for m in read_stream(server, until=4, params={"after": 0}) if "data" in m]
    assert [e["type"] for e in from_start] == LIFE and from_start[0]["data"]["id"] == batch.id
    # Last-Event-ID (a reconnecting client) wins over the `after` of the URL it first connected with.
    both = [json.loads(m["data"]) for m in read_stream(server, until=1, params={"after": 0},
                                                       headers={"last-event-id": str(log[2]["seq"])}) if "data" in m]
    assert both[0]["id"] == log[3]["id"]

    bad = httpx.get(server.root_url + "/v1/events/stream", headers={"last-event-id": "evt_x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_the_stream_needs_the_key(server_factory: ServerFactory) -> None:
    server = server_factory(api_key="sk-events")
    assert httpx.get(server.root_url + "/v1/events/stream").status_code == 401
    assert httpx.get(server.root_url + "/v1/events").status_code == 401
    assert read_stream(server, until=0)[0] == {"retry": "2000"}  # with the key


def test_a_graceful_stop_ends_open_streams_at_once(server: RunningServer) -> None:
    """SIGTERM with dashboards connected: the streams end and the server exits well within uvicorn's graceful
    timeout (5 s), instead of waiting it out for connections that would never close by themselves."""
    ended: list[float] = []
    connected = threading.Semaphore(0)

    def follow() -> None:
        with httpx.stream("GET", server.root_url + "/v1/events/stream", timeout=30) as response:
            connected.release()
            for _ in response.iter_lines():
                pass
        ended.append(time.monotonic())

    readers = [threading.Thread(target=follow) for _ in range(3)]
    for reader in readers:
        reader.start()
    # Signal only once every stream is open: on a loaded machine a fixed sleep let SIGTERM beat a connect.
    for _ in readers:
        assert connected.acquire(timeout=30)
    assert server.process is not None
    asked = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=30)
    exited = time.monotonic() - asked
    for reader in readers:
        reader.join(10)
    assert len(ended) == 3
    assert max(ended) - asked < 2.5 and exited < 3.5, (ended, exited, server.log())
    assert "timeout graceful shutdown exceeded" not in server.log()


# ---- the stream object on the real event log, in process ---------------------------------------------------


@asynccontextmanager
async def event_log(tmp_path: Path) -> AsyncIterator[tuple[EventLog, Lifecycle]]:
    db = await Database.open(tmp_path / "db.sqlite3")
    lifecycle = Lifecycle(db)
    try:
        yield EventLog(db, lifecycle), lifecycle
    finally:
        await db.close()


def batch(n: int) -> BatchRow:
    return BatchRow(id=f"batch_{n}", endpoint="/v1/chat/completions", input_file_id="file-x",
                    completion_window="24h", status=BatchStatus.VALIDATING, created_at=int(time.time()))


class Client:
    """The ASGI side of one HTTP connection: what the stream sent, and a disconnect on demand."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def test_a_stream_ends_when_its_client_disconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with event_log(tmp_path) as (events_log, lifecycle):
            client = Client()
            stream = asyncio.ensure_future(EventStream(events_log, 0, asyncio.Event())({}, client.receive,
                                                                                       client.send))
            await lifecycle.create(batch(1))
            for _ in range(100):
                if b"batch.created" in client.body:
                    break
                await asyncio.sleep(0.01)
            assert b"event: batch.created" in client.body and b"id: 1\n" in client.body
            client.gone.set()
            await asyncio.wait_for(stream, 1.0)  # no event will come: it still ends at once

    asyncio.run(scenario())


def test_a_stream_ends_when_the_server_closes_and_keeps_idle_connections_alive(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with event_log(tmp_path) as (events_log, _):
            client, closing = Client(), asyncio.Event()
            stream = asyncio.ensure_future(EventStream(events_log, 0, closing, heartbeat=0.05)(
                {}, client.receive, client.send))
            # Three heartbeats of 0.05 s: waited for (up to 5 s), not slept for, since a loaded machine's event
            # loop may give the stream fewer turns in a fixed 0.3 s (CI saw 2).
            for _ in range(500):
                if client.body.count(b": keep-alive\n\n") >= 3:
                    break
                await asyncio.sleep(0.01)
            assert client.body.count(b": keep-alive\n\n") >= 3
            closing.set()
            await asyncio.wait_for(stream, 1.0)
            assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}

    asyncio.run(scenario())


def test_a_stream_stops_when_a_write_fails(tmp_path: Path) -> None:
    """An ASGI 2.4 server raises OSError on a write to a connection that is gone."""
    writes = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal writes
        writes += 1
        if writes > 2:
            raise OSError("connection lost")

    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def scenario() -> None:
        async with event_log(tmp_path) as (events_log, _):
            stream = EventStream(events_log, 0, asyncio.Event(), heartbeat=0.02)
            await asyncio.wait_for(stream({}, never, send), 1.0)

    asyncio.run(scenario())
    assert writes == 3


def test_openai_sdk_sees_no_difference(app_factory: AppFactory) -> None:
    """The filters and events are extensions: the SDK's own calls are unchanged."""
    server = app_factory()
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(1)).id)
    assert [b.id for b in client.batches.list()] == [batch.id]
    with pytest.raises(openai.BadRequestError):
        client.batches.list(extra_query={"status": "running"})
