"""The router's own rules, driven in one event loop over real echo engines: prefix affinity, spilling to idle
engines, priorities, abort, failover of a broken engine; the adaptive window; backend specs."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from vllm_batch_server.engines.base import Result
from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.engines.http import BackendSpecError, parse_backends
from vllm_batch_server.engines.router.affinity import CHUNK_CHARS, AffinityTable, prompt_chunks
from vllm_batch_server.engines.router.dispatch import MemberState
from vllm_batch_server.engines.router.router import Router
from vllm_batch_server.engines.router.window import Window
from vllm_batch_server.settings import Settings

CHAT = "/v1/chat/completions"
MODEL = "echo-model"


class Recording(EchoEngine):
    """An echo engine that notes which requests it computed, in order."""

    def __init__(self, name: str, log: list[tuple[str, str]], **settings: Any) -> None:
        super().__init__(Settings(engine="echo", models=[MODEL], **settings))
        self.name = name
        self.log = log

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        result = await super().run(request_id, url, body)
        if (result.body.get("error") or {}).get("message") != "Client disconnected":  # (the reply to a cancel)
            self.log.append((self.name, request_id))
        return result


def router_of(*engines: Recording, **settings: Any) -> Router:
    settings.setdefault("backend_probe_seconds", 0.1)
    return Router([(e.name, "local", e) for e in engines], Settings(engine="echo", models=[MODEL], **settings))


def chat(content: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


def document(rng: random.Random, index: int) -> str:
    words = ["river", "kernel", "garden", "market", "signal", "planet", "engine", "letter", "bridge", "forest"]
    return f"Document {index}: " + " ".join(rng.choice(words) for _ in range(300))  # ~2,000 characters


async def run_pool(router: Router, bodies: list[tuple[str, dict[str, Any]]]) -> dict[str, Result]:
    """Feed the router as the runner does: `capacity` workers, each taking the next request when done."""
    pending = iter(bodies)
    results: dict[str, Result] = {}

    async def worker() -> None:
        for request_id, body in pending:
            results[request_id] = await router.run(request_id, CHAT, body)

    await asyncio.gather(*(worker() for _ in range(router.capacity)))
    return results


def split_documents(log: list[tuple[str, str]]) -> int:
    """How many documents had their questions computed on more than one engine."""
    engines_of: dict[str, set[str]] = defaultdict(set)
    for engine, request_id in log:
        engines_of[request_id.split("-")[0]].add(engine)
    return sum(1 for engines in engines_of.values() if len(engines) > 1)


def shared_document_workload(documents: int = 32, questions: int = 3) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(7)
    bodies = []
    for d in range(documents):
        text = document(rng, d)
        for q in range(questions):  # grouped by document, as the runner's prefix grouping hands them out
            bodies.append((f"doc{d}-q{q}", chat(f"{text}\n\nQuestion {q}: what is said about item {q}?")))
    return bodies


def test_questions_about_one_document_go_to_one_engine() -> None:
    async def scenario(affinity: bool) -> tuple[int, Counter[str]]:
        log: list[tuple[str, str]] = []
        # Different paces, as real engines have: slots free in no fixed pattern.
        engines = [Recording(name, log, window=8, echo_delay=delay) for name, delay in (("a", 0.01), ("b", 0.017))]
        router = router_of(*engines, prefix_affinity=affinity)
        await router.start(MODEL)
        results = await run_pool(router, shared_document_workload())
        await router.stop()
        assert len(results) == 96 and all(r.ok for r in results.values())
        return split_documents(log), Counter(engine for engine, _ in log)

    split, load = asyncio.run(scenario(affinity=True))
    unrouted, unrouted_load = asyncio.run(scenario(affinity=False))
    print(f"documents split across engines: {split} of 32 with affinity, {unrouted} without")
    assert min(load.values()) > 96 * 0.3, load  # both engines kept busy either way
    assert min(unrouted_load.values()) > 96 * 0.3, unrouted_load
    assert split <= 2, split  # at most a document in flight when an engine filled up
    assert unrouted >= split + 3, (split, unrouted)  # without it, documents are computed on both


def test_a_prefix_every_request_shares_spills_to_idle_engines() -> None:
    async def scenario() -> Counter[str]:
        log: list[tuple[str, str]] = []
        engines = [Recording(name, log, window=4, echo_delay=0.01) for name in ("a", "b", "c")]
        router = router_of(*engines)
        await router.start(MODEL)
        system = "You are a careful assistant. " * 100  # one long prefix, then a short question each
        await run_pool(router, [(f"r{i}-x", chat(f"{system}\nQuestion {i}")) for i in range(150)])
        await router.stop()
        return Counter(engine for engine, _ in log)

    load = asyncio.run(scenario())
    assert set(load) == {"a", "b", "c"} and min(load.values()) > 150 * 0.2, load


def test_lower_priority_values_go_first() -> None:
    async def scenario() -> list[str]:
        log: list[tuple[str, str]] = []
        engine = Recording("only", log, window=1, echo_delay=0.3)
        router = router_of(engine)
        await router.start(MODEL)

        async def waiting(count: int) -> None:
            # Not a fixed sleep: on CI's loaded cores "first" once finished before "online" was even queued.
            while router._slots.waiting < count:  # noqa: ASYNC110 (the router has no event to wait on)
                await asyncio.sleep(0.001)

        first = asyncio.create_task(router.run("first", CHAT, chat("x")))
        await asyncio.sleep(0.01)  # "first" holds the only slot (for 0.3 s); the next two wait
        later = asyncio.create_task(router.run("batch", CHAT, chat("y"), priority=5))
        await asyncio.wait_for(waiting(1), 10)
        sooner = asyncio.create_task(router.run("online", CHAT, chat("z"), priority=0))
        await asyncio.wait_for(waiting(2), 10)
        assert not log, log  # both queued while "first" still ran
        await asyncio.gather(first, later, sooner)
        await router.stop()
        return [request_id for _, request_id in log]

    assert asyncio.run(scenario()) == ["first", "online", "batch"]


def test_abort_ends_waiting_and_running_requests_and_the_ids_can_run_again() -> None:
    async def scenario() -> None:
        log: list[tuple[str, str]] = []
        engine = Recording("only", log, window=1, echo_delay=5.0)
        router = router_of(engine)
        await router.start(MODEL)
        tasks = [asyncio.create_task(router.run(f"r{i}", CHAT, chat("x"))) for i in range(3)]
        await asyncio.sleep(0.05)  # r0 running, r1 and r2 waiting for the slot
        await router.abort(["r0", "r1", "r2", "never-started"])
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        engine._delay = 0.0
        again = await asyncio.wait_for(router.run("r1", CHAT, chat("x")), 2)  # aborts do not outlive the run
        assert again.ok
        assert router.members[0].busy == 0
        await router.stop()

    asyncio.run(scenario())


def test_a_crashed_engine_is_taken_out_restarted_and_its_requests_moved(tmp_path: Path) -> None:
    async def scenario() -> None:
        log: list[tuple[str, str]] = []
        steady = Recording("steady", log, window=4, echo_delay=0.01)
        # Crashes once after 30 requests (every request then fails until a restart), as a dead engine would.
        crashing = Recording("crashing", log, window=4, echo_delay=0.01, echo_fault="crash-after=30,times=1")
        router = router_of(steady, crashing)
        await router.start(MODEL)
        results = await run_pool(router, [(f"r{i}-x", chat(f"message number {i}")) for i in range(300)])
        assert len(results) == 300 and all(r.ok for r in results.values())
        computed = Counter(request_id for _, request_id in log)
        assert set(computed) == set(results) and max(computed.values()) == 1  # none computed twice
        member = router.members[1]
        assert member.taken_out == 1 and member.state is MemberState.UP  # restarted, back in rotation
        assert sum(1 for engine, _ in log if engine == "crashing") > 30  # and it took work again
        await router.stop()

    asyncio.run(scenario())


def test_an_engine_that_keeps_failing_is_an_engine_failure_not_request_errors() -> None:
    async def scenario() -> None:
        log: list[tuple[str, str]] = []
        # Every request crashes this engine, however often it is restarted.
        broken = Recording("broken", log, window=2, echo_fault="crash-after=0")
        router = router_of(broken, backend_wait_seconds=0.5)
        await router.start(MODEL)
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(router.run(f"r{i}", CHAT, chat("x")) for i in range(20)), return_exceptions=True), 10)
        await router.stop()
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert failures and all("could not be served" in str(o) or "in rotation" in str(o) for o in failures)

    asyncio.run(scenario())


# ---- the window -------------------------------------------------------------------------------------------


def test_window_grows_to_its_cap_while_answers_are_steady() -> None:
    window = Window(64)
    assert window.limit == 16  # starts at a quarter
    for _ in range(200):
        window.on_success(0.5, 10)
    assert window.limit == 64


def test_window_halves_on_failure_once_per_round_trip() -> None:
    window = Window(64)
    for _ in range(200):
        window.on_success(0.5, 10)
    for _ in range(10):  # a burst of failures from one overload
        window.on_failure()
    assert window.limit == 32
    for _ in range(32):  # a round trip later, another failure halves it again
        window.on_failure()
    assert window.limit <= 16


def test_window_shrinks_on_a_sudden_slowdown_but_not_on_a_steady_pace() -> None:
    window = Window(64)
    for _ in range(200):
        window.on_success(0.5, 10)
    for _ in range(10):
        window.on_success(3.0, 10)  # six times slower from one moment to the next
    assert window.limit < 64
    fixed = Window(8, adaptive=False)
    fixed.on_failure()
    assert fixed.limit == 8


# ---- prefixes and specs ------------------------------------------------------------------------------------


def test_prompt_chunks_are_shared_exactly_as_far_as_the_prompts_are() -> None:
    base = "x" * (CHUNK_CHARS * 3)
    a = prompt_chunks(chat(base + "a" * CHUNK_CHARS))
    b = prompt_chunks(chat(base + "b" * CHUNK_CHARS))
    assert len(a) == len(b) == 4 and a[:3] == b[:3] and a[3] != b[3]
    assert prompt_chunks(chat("short")) == []
    other_model = prompt_chunks({"model": "other", "messages": [{"role": "user", "content": base}]})
    assert not set(other_model) & set(a)
    assert prompt_chunks({"model": MODEL, "prompt": base}) == a[:3]  # a completion prompt reads the same


def test_a_prefix_every_engine_holds_prefers_none() -> None:
    table = AffinityTable()
    shared, own = prompt_chunks(chat("s" * CHUNK_CHARS * 2)), prompt_chunks(chat("s" * CHUNK_CHARS * 2 + "d" * 512))
    table.record(shared, 0)
    table.record(shared, 1)
    table.record(own, 1)
    assert table.preferred(own, live=0b11) == 0b10  # engine 1 holds the longer prefix
    assert table.preferred(shared, live=0b11) == 0  # both hold it: go anywhere
    assert table.preferred(own, live=0b01) == 0  # engine 1 is gone; the one left holds what remains
    table.forget(1)
    assert table.preferred(own, live=0b11) == 0b01  # engine 1 restarted empty: only engine 0 holds a prefix


def test_backend_specs_read_the_same_from_flags_and_from_one_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B_KEY", "sk-secret")
    flags = parse_backends(["http://a:8000/v1,key=env:B_KEY,window=16", "https://b.example/v1/,name=east"], 64)
    env = parse_backends(["http://a:8000/v1", "key=env:B_KEY", "window=16", "https://b.example/v1/", "name=east"], 64)
    assert flags == env
    assert [(s.url, s.window, s.name, s.key) for s in flags] == [
        ("http://a:8000/v1", 16, "http://a:8000/v1", "sk-secret"), ("https://b.example/v1", 64, "east", None)]
    assert "sk-secret" not in repr(flags) and "sk-secret" not in str(flags[0])
    assert parse_backends(["http://c:9000"], 8)[0].url == "http://c:9000/v1"
    with pytest.raises(BackendSpecError, match="given twice"):
        parse_backends(["http://a:8000/v1", "http://a:8000/v1/"], 8)
    with pytest.raises(BackendSpecError, match="no query"):
        parse_backends(["http://u:p@a:8000/v1"], 8)


def test_queues_do_not_grow_with_a_long_batch() -> None:
    # Every request is taken through one queue; the others keep a stale entry for it until compacted.
    async def scenario() -> list[int]:
        log: list[tuple[str, str]] = []
        router = router_of(Recording("a", log, window=16), Recording("b", log, window=16))
        await router.start(MODEL)
        await run_pool(router, [(f"r{i}-x", chat(f"message {i} " + "y" * 600)) for i in range(12_000)])
        slots = router._slots
        sizes = [len(slots._all._heap), len(slots._free_agents._heap),
                 *(len(queue._heap) for queue in slots._preferring)]
        await router.stop()
        return sizes

    assert max(asyncio.run(scenario())) <= 4096
