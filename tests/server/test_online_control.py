"""The online latency controller's law on a synthetic latency feed (queue/online_control.py): deterministic,
no engine, a clock of its own.

A `Plant` stands in for the engine: batch requests in it drain toward a narrower window a few per online answer
(nothing is taken back: they finish first) and refill at once when the window widens; an online answer's time
per token is a function of the batch sequences running beside it. A CPU's grows with them, a GPU's does not."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from vllm_batch_server.queue import online as online_module
from vllm_batch_server.queue import online_control
from vllm_batch_server.queue.online import OnlineTraffic
from vllm_batch_server.queue.online_control import LatencyController, Sample
from vllm_batch_server.settings import Settings

RUNNING = 64  # the engine's sequence slots; an open window holds twice that (the rest waits in its queue)
IDLE = 0.05  # seconds per token alone


def cpu(per_sequence: float = 0.1) -> Callable[[int], float]:
    """Each batch sequence in a step adds `per_sequence` of the idle cost to every token."""
    return lambda running: IDLE * (1 + per_sequence * running)


def flat(ratio: float) -> Callable[[int], float]:
    """Latency that narrowing does not change (a GPU's step, or a cost from elsewhere)."""
    return lambda running: IDLE * ratio if running else IDLE


class Plant:
    def __init__(self, latency: Callable[[int], float], target: float = 2.0, drain: int = 8) -> None:
        self.now = 0.0
        self.latency = latency
        self.drain = drain
        self.control = LatencyController(target, lambda: RUNNING, clock=lambda: self.now)
        self.in_engine = 2 * RUNNING
        self.ratios: list[float] = []
        self.windows: list[int | None] = []

    def idle_answers(self, count: int = 3) -> None:
        for _ in range(count):
            self.now += 1
            self.control.observe(Sample("m", "/v1/chat/completions", self.latency(0), 0, idle=True))

    def answers(self, count: int) -> None:
        """`count` online answers beside the batch, one a second."""
        for _ in range(count):
            limit = self.control.limit()
            if limit is None:
                self.in_engine = 2 * RUNNING
            elif self.in_engine > limit:
                self.in_engine = max(limit, self.in_engine - self.drain)
            else:
                self.in_engine = limit  # the batch refills a wider window at once
            self.now += 1
            seconds = self.latency(min(self.in_engine, RUNNING))
            self.control.observe(Sample("m", "/v1/chat/completions", seconds, self.in_engine, idle=False))
            self.ratios.append(seconds / IDLE)
            self.windows.append(self.control.window)


def test_it_narrows_under_load_until_online_latency_is_within_the_target_and_settles() -> None:
    plant = Plant(cpu())
    plant.idle_answers()
    plant.answers(150)
    assert plant.ratios[0] > 7  # the full batch beside it: 64 sequences in every step
    assert plant.control.changes["narrow"] >= 2 and plant.control.changes["futile"] == 0
    settled = plant.windows[-50:]
    assert len(set(settled)) == 1, settled  # no oscillation once within the band
    window = settled[0]
    assert window is not None and 6 <= window <= 10  # ratio 1 + 0.1 n: within [0.8, 1] × 2 for n in 6..10
    assert max(plant.ratios[-50:]) <= 2.0
    assert plant.control.ratio is not None and 1.6 <= plant.control.ratio <= 2.0


def test_a_cut_that_went_too_far_widens_back_into_the_band() -> None:
    # Beside a full batch an online request also waits for one of the engine's slots to free: far slower than
    # its steps alone explain, so the first cut is the deepest allowed, more than needed.
    plant = Plant(lambda running: IDLE * (1 + 0.02 * running + (15 if running >= RUNNING else 0)))
    plant.idle_answers()
    plant.answers(100)
    assert plant.control.changes["narrow"] == 1 and plant.control.changes["widen"] >= 1
    assert plant.control.window is not None and 1.6 <= 1 + 0.02 * plant.control.window <= 2.0


def test_it_widens_back_to_open_when_narrowing_is_no_longer_needed() -> None:
    plant = Plant(cpu())
    plant.idle_answers()
    plant.answers(80)
    assert plant.control.window is not None and plant.control.window <= 10
    plant.latency = cpu(per_sequence=0.005)  # the batch's steps got cheap: 64 sequences cost 1.3 × idle
    plant.answers(200)
    assert plant.control.changes["widen"] >= 2
    assert plant.control.window is None and plant.control.limit() is None  # open


def test_it_settles_open_where_narrowing_does_not_lower_the_latency() -> None:
    plant = Plant(flat(3.0))  # above the target, but not because of the batch's width
    plant.idle_answers()
    plant.answers(60)
    assert plant.control.changes["futile"] == 1
    assert plant.control.window is None
    # Held open: no cut for FUTILE_HOLD_SECONDS though the ratio stays above the target ...
    narrowed = plant.control.changes["narrow"]
    plant.answers(int(online_control.FUTILE_HOLD_SECONDS) - 70)
    assert plant.control.changes["narrow"] == narrowed and plant.control.window is None
    # ... then one more try, given up again: open nearly all the time.
    plant.answers(100)
    assert plant.control.changes["futile"] == 2 and plant.control.window is None
    assert sum(w is None for w in plant.windows) / len(plant.windows) > 0.8


def test_it_never_narrows_where_online_latency_is_within_the_target_beside_a_full_batch() -> None:
    plant = Plant(flat(1.3))  # a GPU: a step of 64 sequences costs about what one does
    plant.idle_answers()
    plant.answers(100)
    assert plant.control.changes["narrow"] == 0 and set(plant.windows) == {None}
    assert plant.control.ratio == pytest.approx(1.3)


def test_without_an_idle_measurement_it_pauses_batch_work_once_to_take_one() -> None:
    plant = Plant(cpu())
    plant.answers(1)  # online requests only ever came beside the batch: no baseline
    assert plant.control.limit() == 0 and plant.control.probing and plant.control.changes["probe"] == 1
    assert plant.control.ratio is None
    plant.idle_answers(1)  # once the batch work drained, an online request ran alone
    assert plant.control.limit() is None and plant.control.baseline("m", "/v1/chat/completions") == IDLE
    plant.answers(60)
    assert plant.control.window is not None and plant.control.window <= 10


def test_a_probe_that_gets_no_idle_answer_gives_up_and_is_not_retried_at_once() -> None:
    plant = Plant(cpu())
    plant.answers(1)
    assert plant.control.probing
    plant.now += online_control.PROBE_SECONDS + 1
    assert plant.control.limit() is None and not plant.control.probing
    plant.answers(5)  # still no baseline: no new probe before PROBE_RETRY_SECONDS
    assert plant.control.changes["probe"] == 1 and plant.control.limit() is None
    plant.now += online_control.PROBE_RETRY_SECONDS
    plant.answers(1)
    assert plant.control.changes["probe"] == 2 and plant.control.probing


def test_a_stale_baseline_is_measured_again() -> None:
    plant = Plant(cpu())
    plant.idle_answers()
    plant.now += online_control.REFRESH_SECONDS + 1
    plant.answers(1)
    assert plant.control.probing


def test_switched_off_it_measures_but_never_narrows() -> None:
    control = LatencyController(2.0, lambda: RUNNING, enabled=False)
    control.observe(Sample("m", "/v1/chat/completions", IDLE, 0, idle=True))
    for _ in range(20):
        control.observe(Sample("m", "/v1/chat/completions", IDLE * 7, 2 * RUNNING, idle=False))
    assert control.limit() is None and control.window is None and control.ratio == pytest.approx(7)
    assert not LatencyController(0.0, lambda: RUNNING).enabled


def test_another_model_starts_open_with_its_own_baseline() -> None:
    plant = Plant(cpu())
    plant.idle_answers()
    plant.answers(60)
    assert plant.control.window is not None
    plant.control.observe(Sample("other", "/v1/chat/completions", IDLE, 0, idle=True))
    assert plant.control.window is None and plant.control.ratio is None
    assert plant.control.baseline("m", "/v1/chat/completions") == IDLE  # each model keeps its own


def test_online_traffic_applies_the_window_while_online_requests_run_and_lifts_it_after_the_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(online_module, "HOLD_SECONDS", 0.2)

    async def scenario() -> None:
        traffic = OnlineTraffic(Settings(models=["m"]), capacity=lambda: 2 * RUNNING)
        assert traffic.full_window() == 128 and traffic.running_slots() == RUNNING
        for _ in range(3):  # idle answers: the baseline
            traffic.release(traffic.try_admit(), model="m", endpoint="/v1/chat/completions", tokens=1)
        for _ in range(100):
            await traffic.batch_turns.take()  # a batch fills the engine
        admission = traffic.try_admit()
        assert admission is not None and admission.batch_in_flight == 100 and traffic.batch_window() == 128
        await asyncio.sleep(0.05)  # far slower than the idle answers: narrowing at once
        traffic.release(admission, model="m", endpoint="/v1/chat/completions", tokens=1)
        narrowed = int(RUNNING * online_control.MIN_CUT)  # the deepest cut at once: this was far off the target
        assert traffic.control.changes["narrow"] == 1 and traffic.batch_window() == narrowed
        assert traffic.controller_window() == narrowed
        await asyncio.sleep(0.1)
        assert traffic.batch_turns.narrowed  # within the hold: the app's next request finds it in place
        await asyncio.sleep(0.2)
        assert not traffic.batch_turns.narrowed and traffic.batch_window() == 128  # no online traffic: open
        assert traffic.controller_window() == narrowed  # what was learned is kept for the next ones

    asyncio.run(scenario())


def test_a_streamed_answer_far_slower_than_the_target_narrows_before_it_ends() -> None:
    plant = Plant(cpu())
    plant.idle_answers()
    control = plant.control
    slow_so_far = Sample("m", "/v1/chat/completions", IDLE * 3.5, 2 * RUNNING, idle=False)  # 4 tokens in
    assert not control.observe_early(slow_so_far) and control.window is None  # within twice the target: wait
    very_slow = Sample("m", "/v1/chat/completions", IDLE * 20, 2 * RUNNING, idle=False)
    assert control.observe_early(very_slow) and control.window == int(RUNNING * online_control.MIN_CUT)
    assert not control.observe_early(very_slow)  # it began before that window took effect: not again
    assert control.ratio is None  # the exported ratio is of whole answers


def test_streamed_answers_tell_the_controller_their_progress() -> None:
    async def scenario() -> None:
        traffic = OnlineTraffic(Settings(models=["m"]), capacity=lambda: 2 * RUNNING)
        for _ in range(3):
            traffic.release(traffic.try_admit(), model="m", endpoint="/v1/chat/completions", tokens=10)
        for _ in range(100):
            await traffic.batch_turns.take()
        admission = traffic.try_admit()
        assert admission is not None
        await asyncio.sleep(0.05)
        assert traffic.progress(admission, "m", "/v1/chat/completions", 4)
        assert traffic.batch_turns.limit == int(RUNNING * online_control.MIN_CUT)

    asyncio.run(scenario())


def test_when_the_machine_gets_busier_it_steps_back_once_then_stops_narrowing() -> None:
    # Settled on a CPU, then other work takes the cores: online requests are 8 × slower at any window, which no
    # narrowing fixes. It goes back to the last window that met the target, finds no gain, and holds there
    # rather than starving the batch.
    plant = Plant(cpu(0.02))
    plant.idle_answers()
    plant.answers(120)
    settled = plant.control.window
    assert settled is not None and 1.6 <= 1 + 0.02 * settled <= 2.0
    plant.latency = lambda running: 8 * IDLE * (1 + 0.02 * running)
    plant.answers(60)
    assert plant.control.changes["futile"] == 1
    assert min(w for w in plant.windows[-60:] if w is not None) >= settled // 4
    assert plant.control.window is not None and plant.control.window >= settled


def test_one_slow_answer_may_make_the_first_cut_but_only_a_median_judges_after_it() -> None:
    plant = Plant(cpu())
    plant.idle_answers()
    control = plant.control
    slow = Sample("m", "/v1/chat/completions", IDLE * 10, 2 * RUNNING, idle=False)
    control.observe(slow)  # beside the full batch: one answer cuts 64 -> 16 at once
    assert control.window == 16
    as_slow_at_16 = Sample("m", "/v1/chat/completions", IDLE * 10, 16, idle=False)
    for _ in range(2):  # a busy moment of the machine, or the batch? two answers do not tell
        control.observe(as_slow_at_16)
    assert control.window == 16 and control.changes["narrow"] == 1 and control.changes["futile"] == 0
    control.observe(as_slow_at_16)  # three do: a quarter of the batch, no faster
    assert control.changes["futile"] == 1 and control.window is None
