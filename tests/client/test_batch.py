"""The sync client's lifecycle against the fake Batch API: submit, status, wait, download, results, cancel."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.client.conftest import BASE, FakeBatchAPI, chat
from vllm_batch import (
    BatchFailedError,
    BatchStateError,
    BatchStatus,
    BatchTimeoutError,
    NotFoundError,
    VLLMBatch,
)


def make(tmp_path: Path, **kwargs) -> VLLMBatch:
    return VLLMBatch(base_url=BASE, output_dir=tmp_path, **kwargs)


def test_submit_wait_download_results_in_input_order(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        ids = [batch.add_to_batch(**chat(f"q{i}")) for i in range(5)]
        status, out, err = batch.submit_wait_download(progress=False)
        assert status.status == "completed" and status.done
        assert status.request_counts.total == 5 and status.request_counts.completed == 5
        assert out == tmp_path / f"{batch.id}-output.jsonl" and err is None
        # The fake writes results in reverse; the file is the server's, untouched.
        assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ids[::-1]
        results = list(batch.results())
    assert [r.custom_id for r in results] == ids
    assert [r.index for r in results] == list(range(5))
    assert [r.text for r in results] == [f"m1:q{i}" for i in range(5)]
    assert all(r.ok and r.status_code == 200 and r.error is None for r in results)
    assert results[2].request["messages"][0]["content"] == "q2"
    assert api.upload.call_count == 1 and api.create.call_count == 1
    assert api.content.call_count == 1  # results() reused the downloaded file


def test_upload_is_the_spooled_jsonl_and_custom_id_stays_out_of_the_body(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        batch.add_to_batch(custom_id="mine", **chat("hello", temperature=0.5))
        batch.submit()
        [line] = api.input_lines(batch.id)
    assert line == {"custom_id": "mine", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.5}}
    sent = json.loads(api.create.calls.last.request.read())
    assert sent["endpoint"] == "/v1/chat/completions" and sent["completion_window"] == "24h"


def test_submit_is_idempotent(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        first = batch.submit(metadata={"job": "a"})
        second = batch.submit(metadata={"job": "b"})
    assert first == second
    assert api.upload.call_count == 1
    assert api.create.call_count == 1
    assert len(api.batches) == 1
    assert api.batches[first]["metadata"]["job"] == "a"


def test_no_requests_after_submit(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        with pytest.raises(BatchStateError, match="already submitted"):
            batch.add_to_batch(**chat("y"))


def test_submit_without_requests_and_status_before_submit(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        with pytest.raises(BatchStateError, match="no requests"):
            batch.submit()
        with pytest.raises(BatchStateError, match="not been submitted"):
            batch.status()
    assert not api.upload.called


def test_download_before_the_end_refuses(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        with pytest.raises(BatchStateError, match="once it has ended"):
            batch.download()
    assert not api.content.called


def test_wait_polls_adaptively_and_reports(api: FakeBatchAPI, tmp_path: Path, sleeps: list[float]) -> None:
    api.steps = ["validating"] + ["in_progress"] * 1 + ["completed"]
    seen: list[BatchStatus] = []
    # Stay in progress for several polls without moving: the interval should grow, capped.
    stuck = {"n": 0}
    original = api.advance

    def slow_advance(bid: str) -> None:
        stuck["n"] += 1
        if stuck["n"] >= 8 or api.batches[bid]["status"] == "validating":
            original(bid)

    api.advance = slow_advance  # type: ignore[method-assign]
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        final = batch.wait(poll_interval=2.0, callback=seen.append, progress=False)
    assert final.status == "completed"
    assert [s.status for s in seen][-1] == "completed"
    assert len(seen) == api.retrieve.call_count
    assert sleeps == sorted(sleeps), "no progress: the interval only grows"
    assert sleeps[0] <= 1.0 and max(sleeps) == 2.0


def test_wait_timeout(api: FakeBatchAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api.steps = ["validating", "in_progress", "in_progress_forever", "completed"]
    api.advance = lambda bid: None  # type: ignore[method-assign]
    clock = {"t": 1000.0}
    monkeypatch.setattr("vllm_batch._core.time.monotonic", lambda: clock["t"])

    import vllm_batch._sync as sync_mod

    def advancing_sleep(seconds: float) -> None:
        clock["t"] += seconds

    monkeypatch.setattr(sync_mod, "_sleep", advancing_sleep)
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch_id = batch.submit()
        with pytest.raises(BatchTimeoutError) as info:
            batch.wait(poll_interval=1.0, timeout=5.0, progress=False)
    assert info.value.batch_id == batch_id and info.value.status.status == "validating"
    assert clock["t"] == pytest.approx(1005.0)  # never slept past the deadline
    assert api.retrieve.call_count >= 5


def test_failed_batch_raises_with_server_reasons(api: FakeBatchAPI, tmp_path: Path) -> None:
    api.steps = ["validating", "failed"]
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        with pytest.raises(BatchFailedError, match="line 2: bad line") as info:
            batch.wait(progress=False)
        assert info.value.errors[0]["code"] == "invalid_request"
        assert batch.wait(progress=False, raise_on_failure=False).status == "failed"


def test_errors_are_joined_with_their_reason(api: FakeBatchAPI, tmp_path: Path) -> None:
    def responder(line):
        n = int(line["custom_id"].split("-")[1])
        if n == 1:
            return 400, {"error": {"message": "context too long", "type": "invalid_request_error",
                                   "code": "context_length_exceeded", "param": "messages"}}
        if n == 2:
            return {"code": "batch_expired", "message": "This request could not be executed before the completion "
                                                        "window expired."}
        return 200, {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}

    api.responder = responder
    api.drop = {"request-3"}
    with make(tmp_path) as batch:
        for i in range(4):
            batch.add_to_batch(**chat(f"q{i}"))
        _, out, err = batch.submit_wait_download(progress=False)
        assert out is not None and err is not None
        results = list(batch.results())
    assert [r.ok for r in results] == [True, False, False, False]
    assert results[0].text == "ok"
    assert results[1].error.code == "context_length_exceeded" and results[1].error.status_code == 400
    assert results[1].error.message == "context too long" and results[1].error.param == "messages"
    assert results[2].error.code == "batch_expired" and results[2].status_code is None
    assert results[3].error.code == "missing_result" and "completed" in results[3].error.message


def test_cancel(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        for i in range(3):
            batch.add_to_batch(**chat(f"q{i}"))
        batch.submit()
        status = batch.cancel()
        assert status.status == "cancelled"
        assert api.cancel.call_count == 1
        # Already terminal: a second cancel sends nothing.
        assert batch.cancel().status == "cancelled"
        assert api.cancel.call_count == 1
        results = list(batch.results())
    assert [r.ok for r in results] == [True, False, False]
    assert all(r.error.code == "missing_result" and "cancelled" in r.error.message for r in results[1:])


def test_cancel_of_a_batch_that_just_finished(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as batch:
        batch.add_to_batch(**chat("x"))
        batch_id = batch.submit()
        api.batches[batch_id]["status"] = "in_progress"
        api.advance(batch_id)  # completes on the server behind our back
        assert batch.cancel().status == "completed"
    assert api.cancel.call_count == 1 and api.retrieve.call_count == 1


def test_resume_in_a_new_client(api: FakeBatchAPI, tmp_path: Path) -> None:
    with make(tmp_path) as first:
        ids = [first.add_to_batch(custom_id=f"id{i}", **chat(f"q{i}")) for i in range(3)]
        batch_id = first.submit()
    with VLLMBatch.resume(batch_id, base_url=BASE, output_dir=tmp_path) as again:
        assert again.id == batch_id
        again.wait(progress=False)
        results = list(again.results())
    assert [r.custom_id for r in results] == ids
    assert [r.request["messages"][0]["content"] for r in results] == ["q0", "q1", "q2"]
    assert [r.text for r in results] == ["m1:q0", "m1:q1", "m1:q2"]


def test_resume_unknown_batch_is_not_found(api: FakeBatchAPI, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        VLLMBatch.resume("batch_nope", base_url=BASE)
    assert info.value.status_code == 404 and "No batch batch_nope" in info.value.message
    assert info.value.code == "not_found"


def test_list_batches(api: FakeBatchAPI, tmp_path: Path) -> None:
    created = []
    for i in range(3):
        with make(tmp_path) as batch:
            batch.add_to_batch(**chat(f"{i}"))
            created.append(batch.submit())
    with make(tmp_path) as batch:
        listed = batch.list_batches(limit=2)
    assert [b.id for b in listed] == created[::-1][:2]
    assert api.listing.called


def test_from_jsonl_and_from_requests(api: FakeBatchAPI, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat("1")}) + "\n\n"
        + json.dumps(chat("2", custom_id="b")) + "\n"
    )
    with VLLMBatch.from_jsonl(src, base_url=BASE) as batch:
        assert len(batch) == 2
        batch.submit()
        assert [x["custom_id"] for x in api.input_lines(batch.id)] == ["a", "b"]
        assert "custom_id" not in api.input_lines(batch.id)[1]["body"]
    with VLLMBatch.from_requests((chat(str(i)) for i in range(4)), base_url=BASE) as batch:
        assert len(batch) == 4


def test_embeddings_ask_for_base64_and_decode(api: FakeBatchAPI, tmp_path: Path) -> None:
    import array
    import base64

    vector = [0.25, -1.5, 3.0]
    encoded = base64.b64encode(array.array("f", vector).tobytes()).decode()

    def responder(line):
        assert line["body"]["encoding_format"] == "base64"
        return 200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": encoded}],
                     "model": "e", "usage": {"prompt_tokens": 1, "total_tokens": 1}}

    api.responder = responder
    with make(tmp_path) as batch:
        batch.add_to_batch(model="e", input="hello")
        batch.submit_wait_download(progress=False)
        [result] = batch.results()
    assert result.embedding == vector
    assert result.usage == {"prompt_tokens": 1, "total_tokens": 1}
    assert result.parsed().data[0].embedding == vector


def test_progress_bar_follows_request_counts(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    with make(tmp_path) as batch:
        for i in range(4):
            batch.add_to_batch(**chat(f"{i}"))
        batch.submit()
        batch.wait()
    err = capsys.readouterr().err
    assert "4/4" in err and batch.id is not None and batch.id in err


def test_a_failed_comparison_names_the_batch_that_failed(api: FakeBatchAPI, tmp_path: Path) -> None:
    def fail_model_b(request: httpx.Request, bid: str) -> httpx.Response:
        api._retrieve(request, bid)
        batch = api.batches[bid]
        if api.input_lines(bid)[0]["body"]["model"] == "b" and batch["status"] == "completed":
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [{"code": "model_load_failed", "message": "no such model b"}]}
        return httpx.Response(200, json=batch)

    api.retrieve.side_effect = fail_model_b
    with VLLMBatch(base_url=BASE, models=["a", "b"], output_dir=tmp_path) as batch:
        batch.add_to_batch(messages=[{"role": "user", "content": "hi"}])
        batch.submit()
        with pytest.raises(BatchFailedError) as info:
            batch.wait(progress=False)
        first, second = batch.batch_ids
    assert info.value.batch_id == second != first and info.value.model == "b"
    assert str(info.value) == f"batch {second} (model b) failed: no such model b"


def test_an_engine_error_code_is_a_string(api: FakeBatchAPI, tmp_path: Path) -> None:
    """vLLM answers `{"code": 400, "type": "BadRequestError"}`: ResultError.code is typed str, so it is the
    kind, never the number; a number with nothing else becomes its text."""

    def responder(line):
        n = int(line["custom_id"].split("-")[1])
        if n == 0:
            return 400, {"error": {"message": "This model's maximum context length is 2048 tokens.",
                                   "type": "BadRequestError", "param": None, "code": 400}}
        if n == 1:
            return 400, {"error": {"message": "bad", "code": 400}}
        return {"code": 500, "message": "engine said no"}

    api.responder = responder
    with make(tmp_path) as batch:
        for i in range(3):
            batch.add_to_batch(**chat(f"q{i}"))
        batch.submit_wait_download(progress=False)
        errors = [r.error for r in batch.results()]
    assert [e.code for e in errors if e] == ["BadRequestError", "400", "500"]
    assert errors[0] is not None and errors[0].status_code == 400
