"""The pieces of online sharing on their own: the echo engine's priority gate, the priority bands, admission
and the online metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vllm_batch_server.engines.echo import PriorityGate
from vllm_batch_server.queue.online import NARROW_GRACE_SECONDS, BatchTurns, OnlineTraffic
from vllm_batch_server.queue.online_metrics import OnlineMetrics
from vllm_batch_server.queue.priority import BATCH_BASE, batch_priority, online_priority
from vllm_batch_server.settings import Settings


def test_priority_gate_serves_lowest_value_first_then_arrival_order() -> None:
    async def scenario() -> list[str]:
        gate = PriorityGate(1)
        order: list[str] = []

        async def job(name: str, priority: int) -> None:
            async with gate.slot(priority):
                order.append(name)
                await asyncio.sleep(0.01)

        first = asyncio.create_task(job("running", 5))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(job(name, p)) for name, p in
                   (("batch-a", 10), ("batch-b", 10), ("online", 0), ("soon", 7))]
        await asyncio.gather(first, *waiting)
        return order

    assert asyncio.run(scenario()) == ["running", "online", "soon", "batch-a", "batch-b"]


def test_priority_gate_passes_on_the_slot_of_a_cancelled_waiter() -> None:
    async def scenario() -> None:
        gate = PriorityGate(1)
        release = asyncio.Event()

        async def holder() -> None:
            async with gate.slot(0):
                await release.wait()

        async def waiter() -> None:
            async with gate.slot(1):
                pass

        held = asyncio.create_task(holder())
        await asyncio.sleep(0)
        abandoned, patient = asyncio.create_task(waiter()), asyncio.create_task(waiter())
        await asyncio.sleep(0)
        abandoned.cancel()
        release.set()
        await asyncio.wait_for(asyncio.gather(held, patient), 2)  # the slot was not lost with the cancel
        async with gate.slot(0):  # and it is free again
            pass

    asyncio.run(scenario())


def test_priority_bands() -> None:
    assert online_priority(None) == 0 and online_priority(-3) == -3 and online_priority(BATCH_BASE - 1)
    for bad in (BATCH_BASE, "1", 1.5, True):
        with pytest.raises(ValueError, match="below 1000000"):
            online_priority(bad)
    assert BATCH_BASE < batch_priority("30s") < batch_priority("1h") < batch_priority("24h") < batch_priority("30d")
    assert batch_priority("nonsense") == batch_priority("30d")  # never jumps the queue


def test_admission_is_bounded_and_metrics_count_by_model_and_endpoint() -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        metrics = OnlineMetrics(registry, models=["m"])
        traffic = OnlineTraffic(Settings(models=["m"], online_max_requests=2), metrics)
        assert traffic.try_admit() and traffic.try_admit() and not traffic.try_admit()
        traffic.release()
        assert traffic.in_flight == 1 and traffic.try_admit() and not traffic.try_admit()
        traffic.release()
        traffic.release()
        assert traffic.in_flight == 0 and traffic.try_admit()
        metrics.answered("m", "/v1/chat/completions", 200, 0.3)
        metrics.answered("m", "/v1/chat/completions", 429, 0.0)
        metrics.answered("made-up-name", "/v1/embeddings", 404, 0.0)
        metrics.first_token("m", "/v1/chat/completions", 0.05)
        text = generate_latest(registry).decode()
        assert 'vllm_batch_online_requests_total{endpoint="/v1/chat/completions",model="m",status="200"} 1.0' in text
        assert 'vllm_batch_online_requests_total{endpoint="/v1/embeddings",model="other",status="404"} 1.0' in text
        assert 'vllm_batch_online_request_duration_seconds_count{endpoint="/v1/chat/completions",model="m"} 1.0' \
            in text
        assert "vllm_batch_online_time_to_first_token_seconds_count" in text
        assert "vllm_batch_online_requests_in_flight 1.0" in text

    asyncio.run(scenario())


def test_batch_turns_narrow_only_while_online_requests_are_answered() -> None:
    async def scenario() -> None:
        turns = BatchTurns()
        for _ in range(5):
            await turns.take()  # not narrowed: no limit
        assert turns.in_flight == 5
        turns.set_limit(2)
        waiting = asyncio.create_task(turns.take())
        for _ in range(3):
            turns.give_back()
        await asyncio.sleep(0)
        assert not waiting.done() and turns.in_flight == 2  # waits until fewer than 2 are in flight
        turns.give_back()
        await asyncio.sleep(0)
        assert waiting.done() and turns.in_flight == 2
        cancelled = asyncio.create_task(turns.take())
        later = asyncio.create_task(turns.take())
        await asyncio.sleep(0)
        cancelled.cancel()
        turns.set_limit(None)  # online traffic over: everyone goes
        await asyncio.sleep(0)
        assert later.done() and turns.in_flight == 3
        assert turns.taken == 7  # every turn given, the cancelled waiter's excepted

    asyncio.run(scenario())


def test_online_traffic_narrows_batch_work_and_widens_a_grace_period_after() -> None:
    async def scenario() -> None:
        traffic = OnlineTraffic(Settings(models=["m"], online_batch_window=1))
        assert not traffic.batch_turns.narrowed
        assert traffic.try_admit() and traffic.batch_turns.narrowed
        traffic.release()
        await asyncio.sleep(0.5)
        assert traffic.batch_turns.narrowed  # an app's next request usually follows within the grace period
        assert traffic.try_admit()
        traffic.release()
        await asyncio.sleep(NARROW_GRACE_SECONDS + 0.2)
        assert not traffic.batch_turns.narrowed

    asyncio.run(scenario())


def test_echo_steps_cost_more_with_more_requests_in_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps' costs as the clock asks to sleep them, not wall time, which a busy machine stretches."""
    from vllm_batch_server.engines import echo
    from vllm_batch_server.engines.echo import StepClock

    real_sleep = asyncio.sleep
    slept: list[float] = []

    async def record(delay: float, *args: object, **kwargs: object) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(echo.asyncio, "sleep", record)

    async def seconds(clock: StepClock, requests: int) -> float:
        slept.clear()
        await asyncio.gather(*(clock.generate(5) for _ in range(requests)))
        return sum(slept)

    async def scenario() -> tuple[float, float, float]:
        cpu = StepClock(0.01, 0.01)  # 20 ms a step alone, 50 ms with four in it
        gpu = StepClock(0.02, 0.0)
        return await seconds(cpu, 1), await seconds(cpu, 4), await seconds(gpu, 4)

    alone, four, flat = asyncio.run(scenario())
    # Five steps each: 0.1 s alone, 0.25 s beside three others; a step that costs the same for any batch, 0.1 s.
    assert (alone, four, flat) == pytest.approx((0.1, 0.25, 0.1))


def test_echo_step_clock_lets_an_aborted_request_leave() -> None:
    from vllm_batch_server.engines.echo import StepClock

    async def scenario() -> None:
        clock = StepClock(0.01, 0.0)
        long = asyncio.create_task(clock.generate(1000))
        await asyncio.sleep(0.03)
        long.cancel()
        await asyncio.wait_for(clock.generate(2), 1)  # steps go on for the others
        assert long.cancelled()

    asyncio.run(scenario())
