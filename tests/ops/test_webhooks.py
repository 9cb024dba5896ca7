"""Webhooks, end to end: a real server (echo engine) posts to a real receiver, which verifies every delivery with
the official openai SDK's `client.webhooks.unwrap()`. Delivery is at least once with one webhook-id per
delivery, survives kill -9, and a dead receiver never holds up a batch."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Server, ServerFactory, chat_lines, sdk, submit, wait_for
from tests.helpers.receiver import Received, Receiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()
ENDINGS = {"batch.completed", "batch.failed", "batch.expired", "batch.cancelled"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


def unwrap(received: Received, secret: str = SECRET) -> Any:
    """What a user's receiver does: verify the signature and parse the event, with the official SDK."""
    return openai.OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(received.body, received.headers)


def deliveries(server: Server, batch_id: str) -> list[dict[str, Any]]:
    response = server.http.get(f"{server.base_url}/batches/{batch_id}/webhooks", timeout=10)
    response.raise_for_status()
    page = response.json()
    assert page["object"] == "list" and page["has_more"] is False
    return list(page["data"])


def wait_deliveries(server: Server, batch_id: str, until: Any, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(server, batch_id)
        if until(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"deliveries of {batch_id} after {timeout}s: {found}")
        time.sleep(0.1)


def hook(url: str, secret: str | None = SECRET, events: str | None = None) -> list[str]:
    spec = url + (f" secret={secret}" if secret else "") + (f" events={events}" if events else "")
    return ["--webhook", spec]


def test_a_completed_batch_is_delivered_as_openai_sends_it(server_factory: ServerFactory,
                                                           receiver: Receiver) -> None:
    server = server_factory(extra_args=hook(receiver.url))
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(3)).id)
    assert batch.status == "completed"
    (received,) = receiver.wait_for(1)

    event = unwrap(received)
    assert isinstance(event, openai.types.webhooks.BatchCompletedWebhookEvent)
    assert event.type == "batch.completed" and event.object == "event" and event.data.id == batch.id
    assert event.id.startswith("evt_") and abs(event.created_at - batch.completed_at) <= 1
    assert set(received.headers) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert received.headers["content-type"] == "application/json"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(received, OTHER_SECRET)

    (delivery,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["status"] == "delivered")
    assert delivery["id"] == received.headers["webhook-id"] and delivery["id"].startswith("wh_")
    assert delivery["event_id"] == event.id and delivery["event_type"] == "batch.completed"
    assert delivery["attempts"] == 1 and delivery["last_status_code"] == 200 and delivery["url"] == receiver.url
    # Only the four ways a batch ends are sent by default, as OpenAI does.
    time.sleep(0.5)
    assert len(receiver.received) == 1


def test_an_endpoint_may_ask_for_every_lifecycle_event(server_factory: ServerFactory, receiver: Receiver) -> None:
    server = server_factory(extra_args=hook(receiver.url, events="*"))
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(2)).id)
    received = receiver.wait_for(4)
    types = [unwrap(r).type for r in received]
    assert sorted(types) == sorted(["batch.created", "batch.in_progress", "batch.finalizing", "batch.completed"])
    assert {unwrap(r).data.id for r in received} == {batch.id}
    assert len({r.headers["webhook-id"] for r in received}) == 4


def test_each_endpoint_gets_only_the_events_it_asked_for(server_factory: ServerFactory, receiver: Receiver) -> None:
    other = Receiver().start()
    try:
        server = server_factory(extra_args=[*hook(receiver.url, events="batch.failed"),
                                            *hook(other.url, secret=OTHER_SECRET)])
        client = sdk(server)
        completed = wait_for(client, submit(client, chat_lines(2)).id)
        failed = wait_for(client, submit(client, b"not json\n").id)
        assert (completed.status, failed.status) == ("completed", "failed")
        (only,) = receiver.wait_for(1)
        assert unwrap(only).type == "batch.failed" and unwrap(only).data.id == failed.id
        both = other.wait_for(2)
        assert sorted(unwrap(r, OTHER_SECRET).type for r in both) == ["batch.completed", "batch.failed"]
        time.sleep(0.5)
        assert len(receiver.received) == 1
    finally:
        other.stop()


def test_a_failed_attempt_is_retried_with_the_same_webhook_id(server_factory: ServerFactory,
                                                              receiver: Receiver) -> None:
    receiver.answers = [500, 503]
    server = server_factory(extra_args=[*hook(receiver.url), "--webhook-backoff", "0.2"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(2)).id)
    received = receiver.wait_for(3)
    assert len({r.headers["webhook-id"] for r in received}) == 1
    assert len({unwrap(r).id for r in received}) == 1  # every attempt verifies, and is the same event
    assert received[1].at - received[0].at >= 0.15  # backed off
    (delivery,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["status"] == "delivered")
    assert delivery["attempts"] == 3 and delivery["last_status_code"] == 200 and delivery["last_error"] is None


def test_a_delivery_that_never_succeeds_fails_when_its_retry_time_runs_out(server_factory: ServerFactory,
                                                                          receiver: Receiver) -> None:
    receiver.default = 500
    server = server_factory(extra_args=[*hook(receiver.url), "--webhook-backoff", "0.2",
                                        "--webhook-retry-for", "2"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(1)).id)
    (delivery,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["status"] == "failed")
    assert delivery["attempts"] >= 2 and delivery["last_status_code"] == 500
    assert delivery["last_error"] == "HTTP 500" and delivery["next_attempt_at"] is None
    attempts = len(receiver.received)
    time.sleep(1)
    assert len(receiver.received) == attempts  # given up: no more attempts


def test_kill_9_between_completion_and_delivery_delivers_after_restart(server_factory: ServerFactory,
                                                                       tmp_path: Any) -> None:
    """The receiver is down when the batch completes; the server is killed with the delivery pending. After
    the restart, the delivery is made, with the webhook-id recorded before the kill."""
    receiver = Receiver()  # its port, with nothing listening yet: every attempt is refused
    server = server_factory(extra_args=[*hook(receiver.url), "--webhook-backoff", "0.3"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(3)).id)
    assert batch.status == "completed"
    (pending,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["attempts"] >= 1)
    assert pending["status"] == "pending" and pending["last_status_code"] is None
    assert "ConnectError" in pending["last_error"]

    server.kill()
    receiver.start()
    try:
        server.start()
        (received,) = receiver.wait_for(1)
        event = unwrap(received)
        assert event.type == "batch.completed" and event.data.id == batch.id
        assert received.headers["webhook-id"] == pending["id"]
        (delivered,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["status"] == "delivered")
        assert delivered["id"] == pending["id"] and delivered["attempts"] >= 2
        time.sleep(0.5)
        assert len(receiver.received) == 1
    finally:
        receiver.stop()


def test_kill_9_during_an_attempt_sends_it_again_with_the_same_id(server_factory: ServerFactory,
                                                                  receiver: Receiver) -> None:
    """At least once: an attempt cut off by kill -9 before its answer was recorded is made again."""
    receiver.answers = ["hang"]
    server = server_factory(extra_args=[*hook(receiver.url), "--webhook-timeout", "60"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(2)).id)
    (first,) = receiver.wait_for(1)
    server.kill()
    server.start()
    second = receiver.wait_for(2)[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert unwrap(first).id == unwrap(second).id and unwrap(second).data.id == batch.id
    wait_deliveries(server, batch.id, lambda d: d and d[0]["status"] == "delivered")


def test_a_dead_receiver_never_holds_up_batches_or_other_receivers(server_factory: ServerFactory,
                                                                   receiver: Receiver) -> None:
    dead = Receiver(default="hang").start()
    try:
        server = server_factory(extra_args=[*hook(dead.url), *hook(receiver.url), "--webhook-timeout", "60"])
        client = sdk(server)
        began = time.monotonic()
        batches = [submit(client, chat_lines(5, prefix=f"b{i}")) for i in range(6)]
        done = [wait_for(client, b.id, timeout=30) for b in batches]
        assert all(b.status == "completed" for b in done)
        # The healthy receiver got every batch's event while the dead one held its attempts open.
        received = receiver.wait_for(6, timeout=20)
        assert {unwrap(r).data.id for r in received} == {b.id for b in batches}
        assert time.monotonic() - began < 30
        assert len(dead.received) <= 2  # at most two attempts at a time to one receiver
    finally:
        dead.stop()


def test_a_batch_names_its_own_receiver_only_on_an_allowed_host(server_factory: ServerFactory,
                                                                 receiver: Receiver) -> None:
    closed = server_factory("closed")
    with pytest.raises(openai.BadRequestError) as refused:
        submit(sdk(closed), chat_lines(1), metadata={"webhook_url": receiver.url})
    assert refused.value.body["param"] == "metadata.webhook_url"  # type: ignore[index]
    assert refused.value.body["code"] == "webhook_url_not_allowed"  # type: ignore[index]

    server = server_factory("open", extra_args=["--webhook-allowed-host", f"127.0.0.1:{receiver.port}",
                                                "--webhook-secret", SECRET])
    client = sdk(server)
    for url in (f"http://127.0.0.1:{receiver.port + 1}/hook", "http://localhost/hook", "file:///etc/passwd"):
        with pytest.raises(openai.BadRequestError) as other:
            submit(client, chat_lines(1), metadata={"webhook_url": url})
        assert other.value.body["param"] == "metadata.webhook_url"  # type: ignore[index]
    batch = wait_for(client, submit(client, chat_lines(2), metadata={"webhook_url": receiver.url}).id)
    (received,) = receiver.wait_for(1)
    event = unwrap(received)
    assert event.type == "batch.completed" and event.data.id == batch.id
    (delivery,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["status"] == "delivered")
    assert delivery["source"] == "metadata"


def test_deliveries_of_an_unknown_batch_are_not_found(shared_server: Server) -> None:
    for batch_id in ("batch_nope", "file-abc"):
        response = shared_server.http.get(f"{shared_server.base_url}/batches/{batch_id}/webhooks")
        assert response.status_code == 404 and response.json()["error"]["code"] == "batch_not_found"
    client = sdk(shared_server)
    batch = submit(client, chat_lines(1))
    assert deliveries(shared_server, batch.id) == []  # no receiver configured: nothing to deliver


class Trickler:
    """A receiver that reads the request, then sends its answer one byte a second: every read gets a byte long
    before any per-read timeout, so only a bound on the whole attempt ends it."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self) -> None:
        import threading

        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: Any) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok":
                    if self._stop.wait(1.0):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_webhook_timeout(server_factory: ServerFactory) -> None:
    trickler = Trickler()
    try:
        server = server_factory(extra_args=[*hook(trickler.url), "--webhook-timeout", "2", "--webhook-backoff",
                                            "0.5"])
        client = sdk(server)
        batch = wait_for(client, submit(client, chat_lines(1)).id)
        began = time.monotonic()
        (delivery,) = wait_deliveries(server, batch.id, lambda d: d and d[0]["attempts"] >= 2, timeout=15)
        assert time.monotonic() - began < 12  # two attempts of 2 s each, and a back-off between
        assert delivery["status"] == "pending" and "within 2s" in delivery["last_error"], delivery
    finally:
        trickler.stop()


def test_per_batch_urls_on_one_host_never_starve_the_operators_endpoint(server_factory: ServerFactory,
                                                                         receiver: Receiver) -> None:
    stalled = Receiver(default="hang").start()
    try:
        server = server_factory(extra_args=[*hook(receiver.url), "--webhook-timeout", "60",
                                            "--webhook-allowed-host", f"127.0.0.1:{stalled.port}",
                                            "--webhook-secret", SECRET])
        client = sdk(server)
        # 16 batches, each with its own URL (another query) on the one stalled host.
        batches = [submit(client, chat_lines(1, prefix=f"b{i}"), metadata={"webhook_url": f"{stalled.url}?b={i}"})
                   for i in range(16)]
        began = time.monotonic()
        for batch in batches:
            wait_for(client, batch.id, timeout=30)
        received = receiver.wait_for(16, timeout=20)  # the operator's receiver got every one meanwhile
        assert {unwrap(r).data.id for r in received} == {b.id for b in batches}
        assert time.monotonic() - began < 20
        time.sleep(0.5)
        assert 1 <= len(stalled.received) <= 2  # the stalled host is one receiver: two attempts at a time
    finally:
        stalled.stop()
