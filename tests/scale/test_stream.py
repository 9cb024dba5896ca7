"""Online streaming through the router: to a backend that can stream, the backend's events as they come, the
window slot held until the stream ends or is closed, a backend gone before the first event replaced."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.scale.conftest import BackendFactory
from tests.scale.test_router import MODEL, Recording, chat
from vllm_batch_server.engines.base import Result
from vllm_batch_server.engines.http import HttpEngine, parse_backends
from vllm_batch_server.engines.router.dispatch import MemberState
from vllm_batch_server.engines.router.router import Router
from vllm_batch_server.settings import Settings

CHAT = "/v1/chat/completions"


class Plain:
    """An engine that cannot stream (as a Ray replica cannot), computing with an echo engine."""

    def __init__(self, inner: Recording) -> None:
        self.inner = inner

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def model(self) -> str | None:
        return self.inner.model

    async def start(self, model: str) -> None:
        await self.inner.start(model)

    async def stop(self) -> None:
        await self.inner.stop()

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        return await self.inner.run(request_id, url, body)

    async def abort(self, request_ids: list[str]) -> None:
        await self.inner.abort(request_ids)

    async def check_health(self) -> None:
        await self.inner.check_health()


def settings(**values: Any) -> Settings:
    return Settings(engine="http", models=[MODEL], backend_probe_seconds=0.2, **values)


def http_member(url: str, config: Settings) -> tuple[str, str, HttpEngine]:
    [spec] = parse_backends([url + ",window=4"], 4)
    return spec.name, "http", HttpEngine(spec, config)


async def all_in_rotation(router: Router) -> None:
    """Wait (up to 30 s) until every member is in rotation: a backend that misses its first /v1/models (0.2 s
    here, on loaded cores) joins on a later try."""
    for _ in range(600):
        if all(member.state is MemberState.UP for member in router.members):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not every member came into rotation: {router.snapshot()}")


async def collect(outcome: Any) -> str:
    """The text of a chat stream (asserting it is one)."""
    assert not isinstance(outcome, Result), outcome
    text, done = "", False
    buffer = b""
    async for piece in outcome:
        buffer += piece
    for event in buffer.split(b"\n\n"):
        if not event.startswith(b"data: "):
            continue
        data = event[len(b"data: "):]
        if data == b"[DONE]":
            done = True
            continue
        text += json.loads(data)["choices"][0]["delta"].get("content", "")
    assert done
    return text


def test_a_stream_relays_the_backend_events_and_holds_its_slot(echo_backend: BackendFactory) -> None:
    backend = echo_backend("streaming", "--delay", "0.01")

    async def scenario() -> None:
        config = settings()
        router = Router([http_member(backend.url, config)], config)
        await router.start(MODEL)
        outcome = await router.stream("s1", CHAT, {**chat("one two three four"), "stream": True})
        assert router.members[0].busy == 1  # held while the events flow
        assert await collect(outcome) == "one two three four"
        assert router.members[0].busy == 0

        early = await router.stream("s2", CHAT, {**chat("a b c d e f g h"), "stream": True})
        assert not isinstance(early, Result)
        first = await early.__anext__()
        assert first.startswith(b"data: ")
        await early.aclose()  # the client went away
        assert router.members[0].busy == 0

        refused = await router.stream("s3", CHAT, {"model": MODEL, "messages": [], "stream": True})
        assert isinstance(refused, Result) and refused.status_code == 400  # before any event: a plain answer
        await router.stop()

    asyncio.run(scenario())


def test_streams_go_only_to_members_that_can_stream(echo_backend: BackendFactory) -> None:
    backend = echo_backend("streaming", "--delay", "0.01")

    async def scenario() -> None:
        config = settings()
        log: list[tuple[str, str]] = []
        plain = Plain(Recording("plain", log, window=64))
        router = Router([("plain", "local", plain), http_member(backend.url, config)], config)
        await router.start(MODEL)  # returns once one member is up: wait for the other too
        await all_in_rotation(router)

        async def one(i: int) -> str:
            return await collect(await router.stream(f"s{i}", CHAT, {**chat(f"n {i}"), "stream": True}))

        texts = await asyncio.gather(*(one(i) for i in range(12)))  # more at once than the backend's window
        assert texts == [f"n {i}" for i in range(12)]
        assert not log  # the plain engine got none of them
        await router.stop()

    asyncio.run(scenario())


def test_a_backend_gone_before_the_first_event_is_replaced(echo_backend: BackendFactory) -> None:
    gone = echo_backend("gone")
    alive = echo_backend("alive")

    async def scenario() -> None:
        config = settings()
        router = Router([http_member(gone.url, config), http_member(alive.url, config)], config)
        await router.start(MODEL)
        await all_in_rotation(router)  # in rotation before it is killed, or there is nothing to take out
        gone.kill()
        texts = [await collect(await router.stream(f"s{i}", CHAT, {**chat(f"hello {i}"), "stream": True}))
                 for i in range(6)]
        assert texts == [f"hello {i}" for i in range(6)]
        assert router.members[0].taken_out == 1
        await router.stop()

    asyncio.run(scenario())
