"""The progress bar's numbers: rates from what changed between polls, an ETA, and why nothing moves yet."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx
from openai.types import Batch

from tests.client.conftest import BASE, FakeBatchAPI, chat
from vllm_batch import BatchStatus, RequestCounts, VLLMBatch
from vllm_batch._progress import ProgressMeter, describe


def status(done: int, total: int = 100, state: str = "in_progress", failed: int = 0) -> BatchStatus:
    return BatchStatus("batch_1", state, RequestCounts(total, done - failed, failed), ())


def test_a_batch_that_had_progress_before_we_looked_gets_no_invented_rate() -> None:
    meter = ProgressMeter()
    meter.observe(1000.0, 90, 9000)  # resumed at 90 %: says nothing about speed
    assert meter.rate is None and meter.eta(100) is None
    meter.observe(1010.0, 95, 9500)
    assert meter.rate == 0.5 and meter.tokens_per_second == 50.0 and meter.eta(100) == 10.0


def test_the_wait_before_the_first_result_is_not_counted_against_the_rate() -> None:
    meter = ProgressMeter()
    for t in (0.0, 30.0, 60.0):  # a minute of model loading
        meter.observe(t, 0, 0)
    meter.observe(70.0, 20, 600)
    assert meter.rate == 2.0 and meter.tokens_per_second == 60.0


def test_rates_follow_the_recent_pace() -> None:
    meter = ProgressMeter()
    meter.observe(0.0, 0, None)
    meter.observe(10.0, 100, None)  # fast start
    for t in range(20, 1000, 10):
        meter.observe(float(t), 100 + (t - 10) // 10, None)  # then one per 10 s
    assert meter.rate is not None and 0.09 < meter.rate < 0.12
    assert meter.tokens_per_second is None  # the backend reports no usage


def test_describe_shows_rates_and_eta_or_the_reason_for_waiting() -> None:
    meter = ProgressMeter()
    meter.observe(0.0, 10, 100)
    meter.observe(10.0, 30, 2100)
    assert describe(status(30), meter) == "in_progress, 2 req/s, 200 tok/s, ETA 0:35"
    assert describe(status(30, failed=2), meter, "server is loading m") == "in_progress, 2 failed, server is loading m"
    assert describe(status(100, state="completed"), meter) == "completed"


def test_the_bar_says_when_the_server_is_loading_the_model(api: FakeBatchAPI, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    api.server_health = {"status": "ok", "engine": "vllm", "loaded_model": None}
    api.steps = ["validating", "in_progress", "finalizing", "completed"]
    with VLLMBatch(base_url=BASE, output_dir=tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        batch.wait(progress=True)
    err = capsys.readouterr().err
    assert "server is loading m1" in err
    assert api.health.call_count >= 2  # once to recognise the server, then while nothing moved


def test_output_tokens_add_up_over_shards() -> None:
    def batch(bid: str, tokens: int | None) -> Batch:
        usage = None if tokens is None else {"input_tokens": 1, "output_tokens": tokens, "total_tokens": tokens + 1,
                                             "input_tokens_details": {"cached_tokens": 0},
                                             "output_tokens_details": {"reasoning_tokens": 0}}
        return Batch.model_validate({"id": bid, "object": "batch", "endpoint": "/v1/chat/completions",
                                     "input_file_id": "f", "completion_window": "24h", "status": "in_progress",
                                     "created_at": 0, "usage": usage})

    counts = RequestCounts(2, 0, 0)
    assert BatchStatus("a", "in_progress", counts, (batch("a", 40), batch("b", 2))).output_tokens == 42
    assert BatchStatus("a", "in_progress", counts, (batch("a", None),)).output_tokens is None


@pytest.mark.parametrize("batch_server", [True, False])
def test_a_batch_server_is_polled_every_few_seconds_until_the_first_result(
        api: FakeBatchAPI, sleeps: list[float], tmp_path: Path, batch_server: bool) -> None:
    """While a batch waits (a model loading, a batch ahead) polls backed off to poll_interval, and a short batch
    then ran between two polls: the demo's bar went from 0/36 to 36/36 with no rate or ETA. A vllm-batch server
    is asked every few seconds until the first result; any other provider still backs off to poll_interval."""
    api.server_health = {"status": "ok", "engine": "echo", "loaded_model": "m1"} if batch_server else None
    polls = 0
    finish = api.advance

    def advance(bid: str) -> None:
        nonlocal polls
        polls += 1
        if polls < 25:  # nothing done yet: the batch ahead still runs
            api.batches[bid]["status"] = "in_progress"
            return
        finish(bid)

    api.advance = advance  # type: ignore[method-assign]
    with VLLMBatch(base_url=BASE, output_dir=tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        assert batch.wait(poll_interval=60, progress=False).status == "completed"
    assert len(sleeps) >= 20
    if batch_server:
        assert max(sleeps) <= 2.0, sleeps
    else:
        assert max(sleeps) == 60, sleeps


@pytest.mark.parametrize("served", [["m0", "m1"], ["m0"]])
def test_the_bar_names_the_next_model_only_if_the_server_serves_it(
        sleeps: list[float], tmp_path: Path, capsys: pytest.CaptureFixture[str], served: list[str]) -> None:
    """`server is running m0, no-such-model is next` was shown for a model the server does not serve (it
    refuses the batch instead): the bar names what is next only when /v1/models lists it."""
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        api = FakeBatchAPI(router)
        api.server_health = {"status": "ok", "engine": "vllm", "loaded_model": "m0"}
        models = router.get(f"{BASE}/models").mock(return_value=httpx.Response(200, json={
            "object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in served]}))
        api.steps = ["validating", "in_progress", "finalizing", "completed"]
        with VLLMBatch(base_url=BASE, output_dir=tmp_path) as batch:
            batch.add_to_batch(**chat("x", model="m1"))
            batch.submit()
            batch.wait(progress=True)
    err = capsys.readouterr().err
    assert ("server is running m0, m1 is next" in err) == ("m1" in served)
    assert models.call_count == 1  # asked once per wait
