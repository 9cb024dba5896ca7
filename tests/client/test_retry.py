"""Retries: what is retried, how long we wait, and what surfaces when retrying is not the answer."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import httpx
import pytest
import respx

from tests.client.conftest import BASE, FakeBatchAPI, chat
from vllm_batch import (
    APIConnectionError,
    APITimeoutError,
    AsyncVLLMBatch,
    BadRequestError,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
    VLLMBatch,
)
from vllm_batch._retry import retry_after

NO_JITTER = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=3.0, jitter=0.0)


def error(status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None):
    return httpx.Response(status, headers=headers,
                          json={"error": {"message": message, "type": "x", "code": code, "param": None}})


def submitted(api: FakeBatchAPI, **kwargs) -> VLLMBatch:
    batch = VLLMBatch(base_url=BASE, **kwargs)
    batch.add_to_batch(**chat("x"))
    batch.submit()
    return batch


def test_5xx_is_retried_with_exponential_backoff_then_succeeds(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=NO_JITTER) as batch:
        api.retrieve.side_effect = [error(503, "busy"), error(500, "oops"), error(502, "gw"), api._retrieve]
        assert batch.status().status == "in_progress"  # the fake moves a step per retrieve
    assert api.retrieve.call_count == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_backoff_is_capped(api: FakeBatchAPI, sleeps: list[float]) -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=1.0, max_backoff=3.0, jitter=0.0)
    with submitted(api, retry=policy) as batch:
        api.retrieve.side_effect = [error(503, "busy")] * 5 + [api._retrieve]
        batch.status()
    assert sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_jitter_stays_within_its_fraction(api: FakeBatchAPI, sleeps: list[float]) -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=1.0, max_backoff=100.0, jitter=0.5)
    with submitted(api, retry=policy) as batch:
        api.retrieve.side_effect = [error(503, "busy")] * 3 + [api._retrieve]
        batch.status()
    for wait, base in zip(sleeps, [1.0, 2.0, 4.0], strict=True):
        assert base <= wait <= base * 1.5


def test_429_honours_retry_after_seconds(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=NO_JITTER) as batch:
        api.retrieve.side_effect = [error(429, "slow down", {"Retry-After": "7"}), api._retrieve]
        batch.status()
    assert sleeps == [7.0]
    assert api.retrieve.call_count == 2


def test_retry_after_ms_and_http_date() -> None:
    request = httpx.Request("GET", BASE)
    import openai

    def exc(headers):
        return openai.RateLimitError("x", response=httpx.Response(429, headers=headers, request=request), body=None)

    assert retry_after(exc({"retry-after-ms": "250"})) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after(exc({"Retry-After": date})) <= 31
    assert retry_after(exc({"Retry-After": "soon"})) is None
    assert retry_after(exc({})) is None


def test_retry_after_is_capped(api: FakeBatchAPI, sleeps: list[float]) -> None:
    policy = RetryPolicy(max_attempts=3, max_retry_after=10.0, jitter=0.0)
    with submitted(api, retry=policy) as batch:
        api.retrieve.side_effect = [error(429, "later", {"Retry-After": "3600"}), api._retrieve]
        batch.status()
    assert sleeps == [10.0]


def test_429_exhausted_surfaces_typed_error_with_server_message(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=RetryPolicy(max_attempts=3, jitter=0.0)) as batch:
        api.retrieve.side_effect = error(429, "Rate limit reached for batches", code="rate_limit_exceeded")
        with pytest.raises(RateLimitError) as info:
            batch.status()
    assert api.retrieve.call_count == 3 and len(sleeps) == 2
    assert info.value.status_code == 429
    assert info.value.message == "Rate limit reached for batches"
    assert info.value.code == "rate_limit_exceeded"


def test_5xx_exhausted(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=RetryPolicy(max_attempts=2, jitter=0.0)) as batch:
        api.retrieve.side_effect = error(500, "engine died")
        with pytest.raises(InternalServerError, match="engine died"):
            batch.status()
    assert api.retrieve.call_count == 2


def test_4xx_is_not_retried(api: FakeBatchAPI, sleeps: list[float]) -> None:
    api.create.side_effect = httpx.Response(400, json={"error": {
        "message": "Line 3: custom_id is duplicated", "type": "invalid_request_error",
        "code": "duplicate_custom_id", "param": "custom_id"}})
    batch = VLLMBatch(base_url=BASE)
    batch.add_to_batch(**chat("x"))
    with batch, pytest.raises(BadRequestError) as info:
        batch.submit()
    assert api.create.call_count == 1 and sleeps == []
    assert info.value.message == "Line 3: custom_id is duplicated"
    assert info.value.code == "duplicate_custom_id" and info.value.param == "custom_id"
    assert str(info.value) == "HTTP 400 (duplicate_custom_id): Line 3: custom_id is duplicated"


def test_non_json_error_body_keeps_the_text(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=RetryPolicy(max_attempts=1)) as batch:
        api.retrieve.side_effect = httpx.Response(502, text="<html>Bad Gateway</html>")
        with pytest.raises(InternalServerError) as info:
            batch.status()
    assert "Bad Gateway" in info.value.message and info.value.status_code == 502


def test_connection_errors_and_timeouts_are_retried(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=NO_JITTER) as batch:
        api.retrieve.side_effect = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), api._retrieve]
        assert batch.status().status == "in_progress"  # the fake moves a step per retrieve
    assert api.retrieve.call_count == 3 and sleeps == [0.5, 1.0]


def test_connection_error_exhausted(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=RetryPolicy(max_attempts=3, jitter=0.0)) as batch:
        api.retrieve.side_effect = httpx.ConnectError("refused")
        with pytest.raises(APIConnectionError, match="refused"):
            batch.status()
        api.retrieve.side_effect = httpx.ReadTimeout("slow")
        with pytest.raises(APITimeoutError):
            batch.status()
    assert api.retrieve.call_count == 6


def test_openai_sdk_does_not_retry_on_its_own(api: FakeBatchAPI, sleeps: list[float]) -> None:
    with submitted(api, retry=RetryPolicy(max_attempts=1)) as batch:
        api.retrieve.side_effect = error(503, "busy")
        with pytest.raises(InternalServerError):
            batch.status()
        assert batch._client.max_retries == 0
    assert api.retrieve.call_count == 1


def test_upload_is_retried_with_the_whole_file(api: FakeBatchAPI, sleeps: list[float]) -> None:
    api.upload.side_effect = [error(503, "busy"), api._upload]
    with VLLMBatch(base_url=BASE, retry=NO_JITTER) as batch:
        for i in range(3):
            batch.add_to_batch(**chat(str(i)))
        batch.submit()
        assert len(api.input_lines(batch.id)) == 3
    assert api.upload.call_count == 2


def test_create_retried_after_a_lost_response_does_not_duplicate(api: FakeBatchAPI, sleeps: list[float]) -> None:
    """The server created the batch but the answer never arrived: the retry finds it instead of making another."""

    def created_then_lost(request):
        api._create(request)
        raise httpx.ReadTimeout("connection dropped after the server acted")

    api.create.side_effect = [created_then_lost, api._create]
    with VLLMBatch(base_url=BASE, retry=NO_JITTER) as batch:
        batch.add_to_batch(**chat("x"))
        batch_id = batch.submit()
    assert len(api.batches) == 1 and batch_id in api.batches
    assert api.create.call_count == 1 and api.listing.call_count == 1


def test_download_is_retried_and_left_complete(api: FakeBatchAPI, sleeps: list[float], tmp_path: Path) -> None:
    with VLLMBatch(base_url=BASE, retry=NO_JITTER, output_dir=tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        batch.wait(progress=False)
        api.content.side_effect = [error(500, "disk"), api._content]
        out, _ = batch.download()
        assert out is not None and len(out.read_text().splitlines()) == 1
        assert not out.with_name(out.name + ".part").exists()
    assert api.content.call_count == 2


@pytest.mark.anyio
async def test_async_retries_429_with_retry_after(sleeps: list[float]) -> None:
    with respx.mock(assert_all_called=False) as router:
        api = FakeBatchAPI(router)
        api.create.side_effect = [error(429, "later", {"Retry-After": "2"}), error(503, "busy"), api._create]
        async with AsyncVLLMBatch(base_url=BASE, retry=NO_JITTER) as batch:
            batch.add_to_batch(**chat("x"))
            batch_id = await batch.submit()
        assert batch_id in api.batches
        # Before each retry of a create, the client looks for a batch the last attempt may have made.
        assert api.create.call_count == 3 and api.listing.call_count == 2
    assert sleeps == [2.0, 1.0]


@pytest.mark.anyio
async def test_async_exhausted_errors_are_typed(sleeps: list[float]) -> None:
    with respx.mock(assert_all_called=False) as router:
        api = FakeBatchAPI(router)
        api.upload.side_effect = httpx.ConnectError("nope")
        async with AsyncVLLMBatch(base_url=BASE, retry=RetryPolicy(max_attempts=2, jitter=0.0)) as batch:
            batch.add_to_batch(**chat("x"))
            with pytest.raises(APIConnectionError):
                await batch.submit()
        assert api.upload.call_count == 2 and not api.create.called


# -- a create whose answer was lost, across calls and processes (issue: duplicate batches) ---------------


def lose_create_answer(api: FakeBatchAPI):
    """The server makes the batch, then the connection drops before its answer arrives."""

    def created_then_lost(request):
        api._create(request)
        raise httpx.ReadTimeout("connection dropped after the server acted")

    return created_then_lost


def test_a_second_submit_after_a_lost_create_makes_no_duplicate(api: FakeBatchAPI, sleeps: list[float]) -> None:
    api.create.side_effect = lose_create_answer(api)
    with VLLMBatch(base_url=BASE, retry=RetryPolicy(max_attempts=1)) as batch:
        batch.add_to_batch(**chat("x"))
        with pytest.raises(APITimeoutError, match=r"http://batch\.test/v1"):
            batch.submit()
        api.create.side_effect = api._create
        batch_id = batch.submit()  # the provider ignores Idempotency-Key: found by its metadata
    assert list(api.batches) == [batch_id]
    assert api.create.call_count == 1 and api.upload.call_count == 1


@pytest.mark.parametrize("honours_key", [True, False], ids=["server-honours-key", "provider-ignores-key"])
def test_a_new_process_with_the_same_workdir_finds_the_batch(api: FakeBatchAPI, sleeps: list[float],
                                                             tmp_path: Path, honours_key: bool) -> None:
    api.honour_idempotency = honours_key
    api.create.side_effect = lose_create_answer(api)
    work = tmp_path / "work"
    with VLLMBatch(base_url=BASE, workdir=work, retry=RetryPolicy(max_attempts=1)) as batch:
        batch.add_to_batch(custom_id="a", **chat("x"))
        with pytest.raises(APITimeoutError):
            batch.submit(metadata={"job": "nightly"})
    api.create.side_effect = api._create
    if honours_key:
        # A listing that does not show the batch yet: only the key can tell the server it is a repeat.
        api.listing.side_effect = lambda request: httpx.Response(200, json={"object": "list", "data": [],
                                                                            "has_more": False})
    with VLLMBatch(base_url=BASE, workdir=work) as again:  # a new process: same requests, same workdir
        again.add_to_batch(custom_id="a", **chat("x"))
        batch_id = again.submit(metadata={"job": "nightly"})
    assert list(api.batches) == [batch_id]
    assert api.upload.call_count == 1  # the file id was in the journal
    keys = {call.request.headers.get("idempotency-key") for call in api.create.calls}
    assert len(keys) == 1 and None not in keys


def test_other_requests_in_the_same_workdir_are_a_new_batch(api: FakeBatchAPI, tmp_path: Path) -> None:
    work = tmp_path / "work"
    with VLLMBatch(base_url=BASE, workdir=work) as batch:
        batch.add_to_batch(**chat("x"))
        first = batch.submit()
    with VLLMBatch(base_url=BASE, workdir=work) as batch:
        batch.add_to_batch(**chat("y"))
        second = batch.submit()
    with VLLMBatch(base_url=BASE, workdir=work) as batch:
        batch.add_to_batch(**chat("y"))
        assert batch.submit() == second  # the same requests again: the batch already made
    assert first != second and len(api.batches) == 2


def test_a_lost_upload_answer_gets_the_same_file_from_a_server_that_honours_the_key(
        api: FakeBatchAPI, sleeps: list[float]) -> None:
    api.honour_idempotency = True

    def stored_then_lost(request):
        api._upload(request)
        raise httpx.ReadTimeout("dropped")

    api.upload.side_effect = [stored_then_lost, api._upload]
    with VLLMBatch(base_url=BASE, retry=NO_JITTER) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
    assert len(api.files) == 1 and api.upload.call_count == 2
    first, second = (call.request.headers["idempotency-key"] for call in api.upload.calls)
    assert first == second


def test_a_reused_key_with_another_body_is_a_conflict(api: FakeBatchAPI) -> None:
    api.honour_idempotency = True
    request = httpx.Request("POST", f"{BASE}/batches", headers={"Idempotency-Key": "k"},
                            json={"input_file_id": "f", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    api.files["f"] = b""
    assert api._create(request).status_code == 200
    other = httpx.Request("POST", f"{BASE}/batches", headers={"Idempotency-Key": "k"},
                          json={"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h"})
    answer = api._create(other)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.anyio
async def test_async_second_submit_after_a_lost_create_makes_no_duplicate(sleeps: list[float]) -> None:
    with respx.mock(assert_all_called=False) as router:
        api = FakeBatchAPI(router)
        api.create.side_effect = lose_create_answer(api)
        async with AsyncVLLMBatch(base_url=BASE, retry=RetryPolicy(max_attempts=1)) as batch:
            batch.add_to_batch(**chat("x"))
            with pytest.raises(APITimeoutError):
                await batch.submit()
            api.create.side_effect = api._create
            batch_id = await batch.submit()
        assert list(api.batches) == [batch_id] and api.create.call_count == 1


def test_retries_are_reported_not_silent(api: FakeBatchAPI, sleeps: list[float],
                                         caplog: pytest.LogCaptureFixture) -> None:
    with submitted(api, retry=NO_JITTER) as batch:
        api.retrieve.side_effect = [httpx.ConnectError("[Errno 111] Connection refused"), api._retrieve]
        batch.status()
    [record] = [r for r in caplog.records if r.name == "vllm_batch"]
    assert "cannot reach http://batch.test/v1 ([Errno 111] Connection refused)" in record.getMessage()
    assert "retrying in 0.5 s (attempt 2 of 5)" in record.getMessage()


def test_follow_up_calls_are_retried_and_reported_as_core_calls_are(sleeps: list[float],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    with respx.mock(assert_all_called=False) as router:
        api = FakeBatchAPI(router)
        marks = router.get(url__regex=rf"{BASE}/batches/[^/]+/marks").mock(side_effect=[
            refused, error(503, "busy"),
            httpx.Response(200, json={"object": "list", "has_more": False, "last_id": "q", "data": [
                {"custom_id": "q", "label": "gold", "score": 5, "note": None, "batch_id": "b"}]})])
        with submitted(api, retry=NO_JITTER) as batch:
            assert [(m.custom_id, m.label) for m in batch.marks()] == [("q", "gold")]
            assert marks.call_count == 3
            api.retrieve.side_effect = [refused, api._retrieve]
            batch.status()
    assert sleeps == [0.5, 1.0, 0.5]
    follow_up, busy, core = [r.getMessage() for r in caplog.records if r.name == "vllm_batch"]
    # One line, written by BatchCore.call for both: only the operation's name differs.
    assert follow_up.replace("listmarks", "retrieve") == core
    assert core == ("retrieve failed: cannot reach http://batch.test/v1 ([Errno 111] Connection refused); "
                    "retrying in 0.5 s (attempt 2 of 5)")
    assert busy == "listmarks failed: HTTP 503: busy; retrying in 1.0 s (attempt 3 of 5)"


@pytest.mark.anyio
async def test_async_retry_failed_is_retried_by_the_core_with_one_key(sleeps: list[float],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    with respx.mock(assert_all_called=False) as router:
        api = FakeBatchAPI(router)

        def create_retry(request: httpx.Request) -> httpx.Response:
            [original] = api.batches.values()
            return api._store_batch({"input_file_id": original["input_file_id"], "endpoint": original["endpoint"],
                                     "completion_window": "24h", "metadata": {"retry_of": original["id"]}})

        retry = router.post(f"{BASE}/batches/retry").mock(side_effect=[error(502, "gateway"), create_retry])
        async with AsyncVLLMBatch(base_url=BASE, retry=NO_JITTER) as batch:
            batch.add_to_batch(**chat("x"))
            original_id = await batch.submit()
            async with await batch.retry_failed() as again:
                assert isinstance(again, AsyncVLLMBatch) and again.id != original_id
                assert (await again.status()).metadata == {"retry_of": original_id}
    assert retry.call_count == 2
    first, second = (call.request.headers["idempotency-key"] for call in retry.calls)
    assert first == second  # a retried POST is the same request: the server answers it with one batch
    assert sleeps == [0.5]
    [line] = [r.getMessage() for r in caplog.records if r.name == "vllm_batch"]
    assert line == "retrybatches failed: HTTP 502: gateway; retrying in 0.5 s (attempt 2 of 5)"
