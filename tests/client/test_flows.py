"""The sans-IO flows stepped by hand: each flow's operations, in order, with answers and failures we choose.

No HTTP, no fake server: what the core asks for is asserted directly, so retries, the recovery of a lost
create and the download-to-.part rule are shown to live in the core, the same for both shells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types import Batch

from tests.client.conftest import chat
from vllm_batch import APIConnectionError, BadRequestError, InternalServerError, Mark, RetryPolicy
from vllm_batch._core import META_GROUP, META_SHARD, BatchCore
from vllm_batch._followup import Follower, set_mark
from vllm_batch._ops import (
    CreateBatch,
    Download,
    Flow,
    ListBatches,
    Local,
    PutMark,
    ReadResults,
    Retrieve,
    ServerInfo,
    Sleep,
    Upload,
)
from vllm_batch._providers import resolve_provider

NO_JITTER = RetryPolicy(max_attempts=4, initial_backoff=1.0, jitter=0.0)


def batch_object(bid: str, status: str = "validating", metadata: dict[str, str] | None = None,
                 **extra: Any) -> Batch:
    return Batch.model_validate({
        "id": bid, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file_1",
        "completion_window": "24h", "status": status, "created_at": 1, "metadata": metadata,
        "request_counts": {"total": 1, "completed": 0, "failed": 0}, **extra})


class Stepper:
    """Drives a flow one operation at a time."""

    def __init__(self, flow: Flow[Any]) -> None:
        self.flow = flow
        self.op: Any = None
        self.result: Any = None
        self.done = False
        self._advance(lambda: next(flow))  # a flow may end without asking for anything

    def _advance(self, step: Any) -> Any:
        try:
            self.op = step()
        except StopIteration as stop:
            self.done, self.op, self.result = True, None, stop.value
        return self.op

    def send(self, value: Any = None) -> Any:
        return self._advance(lambda: self.flow.send(value))

    def throw(self, exc: BaseException) -> Any:
        return self._advance(lambda: self.flow.throw(exc))

    def run_local(self) -> Any:
        assert isinstance(self.op, Local)
        return self.send(self.op.fn())


@pytest.fixture
def core(tmp_path: Path) -> BatchCore:
    core = BatchCore(resolve_provider(base_url="http://batch.test/v1"), workdir=tmp_path / "work", retry=NO_JITTER)
    core.add(chat("x"), custom_id="only", endpoint=None)
    return core


def submit_until_create(core: BatchCore) -> Stepper:
    step = Stepper(core.submit())
    assert isinstance(step.op, ServerInfo)  # a custom URL: is it a vllm-batch-server?
    step.send(None)  # no
    step.run_local()  # the shard plan
    assert isinstance(step.op, Upload) and step.op.idempotency_key
    step.send("file_1")
    assert isinstance(step.op, CreateBatch)
    return step


def test_submit_asks_for_plan_upload_create_in_order(core: BatchCore) -> None:
    step = submit_until_create(core)
    create = step.op
    assert create.input_file_id == "file_1" and create.idempotency_key
    assert create.metadata[META_SHARD] == "0/1" and create.metadata[META_GROUP] == core.group
    step.send(batch_object("batch_1", metadata=create.metadata))
    assert step.done and step.result == "batch_1"


def test_a_retried_create_looks_for_the_batch_first_and_resends_the_same_key(core: BatchCore) -> None:
    step = submit_until_create(core)
    first = step.op
    step.throw(APIConnectionError("cannot reach http://batch.test/v1 (connection dropped)"))
    assert step.op == Sleep(1.0)
    step.send()
    # The create may have reached the server: find it before creating again.
    assert step.op == ListBatches(100, None)
    step.send(([batch_object("batch_other", metadata={"x": "y"})], False))
    assert isinstance(step.op, CreateBatch) and step.op.idempotency_key == first.idempotency_key
    step.send(batch_object("batch_1", metadata=first.metadata))
    assert step.result == "batch_1"


def test_the_lookup_returns_the_batch_the_lost_attempt_made(core: BatchCore) -> None:
    step = submit_until_create(core)
    lost = step.op
    step.throw(InternalServerError("gateway", status_code=502))
    step.send()  # the backoff
    step.send(([batch_object("batch_made", metadata=lost.metadata)], False))
    assert step.done and step.result == "batch_made"


def test_second_submit_after_lost_create_finds_the_batch(core: BatchCore) -> None:
    step = submit_until_create(core)
    create = step.op
    with pytest.raises(BadRequestError):
        step.throw(BadRequestError("no", status_code=400))
    again = Stepper(core.submit())
    assert again.op == ListBatches(100, None)  # no re-upload, and a look before any create
    again.send(([batch_object("batch_1", metadata=create.metadata)], False))
    assert again.done and again.result == "batch_1"


def test_http_operations_are_retried_by_the_core_with_backoff(core: BatchCore) -> None:
    step = Stepper(core.call(Retrieve("batch_1")))
    for delay in (1.0, 2.0, 4.0):
        step.throw(InternalServerError("busy", status_code=503))
        assert step.op == Sleep(delay)
        step.send()
        assert step.op == Retrieve("batch_1")
    with pytest.raises(InternalServerError):  # the fourth attempt was the last
        step.throw(InternalServerError("busy", status_code=503))


def test_retry_after_is_waited_exactly(core: BatchCore) -> None:
    step = Stepper(core.call(Retrieve("batch_1")))
    step.throw(InternalServerError("later", status_code=503, retry_after=7.0))
    assert step.op == Sleep(7.0)


def test_download_goes_to_a_part_file_then_takes_its_name(core: BatchCore, tmp_path: Path) -> None:
    dest = tmp_path / "new" / "folder" / "out.jsonl"
    step = Stepper(core._download("file_9", dest))
    assert step.op == Download("file_9", dest.with_name("out.jsonl.part"))
    assert dest.parent.is_dir()  # made for it
    step.op.path.write_text("{}\n")
    assert not dest.exists()
    step.send()
    assert step.done and dest.read_text() == "{}\n" and not step.op


def test_a_failed_download_leaves_no_file_under_the_final_name(core: BatchCore, tmp_path: Path) -> None:
    dest = tmp_path / "out.jsonl"
    step = Stepper(core._download("file_9", dest))
    step.op.path.write_text("{half")
    step.throw(APIConnectionError("dropped"))
    assert isinstance(step.op, Sleep) and not dest.exists()


def test_closing_a_waiting_flow_closes_its_progress_bar(core: BatchCore, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []
    monkeypatch.setattr("vllm_batch._progress.ProgressBar.close", lambda self: closed.append(True))
    step = submit_until_create(core)
    step.send(batch_object("batch_1", metadata=step.op.metadata))
    wait = Stepper(core.wait(poll_interval=1, timeout=None, callback=None, progress=True, raise_on_failure=True))
    assert wait.op == Retrieve("batch_1")
    wait.send(batch_object("batch_1", status="in_progress"))
    assert isinstance(wait.op, Sleep)
    wait.flow.close()  # what the shells do when the caller is interrupted
    assert closed == [True]


def submitted_core(core: BatchCore) -> BatchCore:
    step = submit_until_create(core)
    step.send(batch_object("batch_1", metadata=step.op.metadata))
    return core


def test_an_extension_call_is_an_operation_the_core_retries(core: BatchCore) -> None:
    step = Stepper(set_mark(submitted_core(core), "only", label="gold", score=None, note=None, batch_id=None))
    assert step.op == PutMark("batch_1", "only", "gold")
    assert step.op.request().path == "/batches/batch_1/marks/only"
    step.throw(InternalServerError("busy", status_code=503))
    assert step.op == Sleep(1.0)
    step.send()
    assert step.op == PutMark("batch_1", "only", "gold")
    step.send({"custom_id": "only", "label": "gold", "batch_id": "batch_1"})
    assert step.done and step.result == Mark("only", "gold", batch_id="batch_1")


def result_line(custom_id: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": {"choices": []}}}).encode()


def test_follow_hands_over_a_page_at_a_time_and_polls_between_rounds(core: BatchCore) -> None:
    follower = Follower(submitted_core(core), errors=False, page_size=2, poll_interval=1.0, timeout=None)
    start = Stepper(follower.start())
    start.run_local()  # the request lookup
    assert start.done
    page = Stepper(follower.next_page())
    assert page.op == ReadResults("batch_1", "output", 0, 2)
    page.send(([result_line("only"), result_line("other")], {"x-next-line": "2", "x-batch-status": "in_progress"}))
    assert page.done and [(r.index, r.custom_id) for r in page.result] == [(0, "only"), (-1, "other")]
    page = Stepper(follower.next_page())
    assert page.op == ReadResults("batch_1", "output", 2, 2)  # a full page: read on
    page.send(([], {"x-next-line": "2", "x-batch-status": "in_progress"}))
    assert isinstance(page.op, Sleep)  # nothing more for now: wait before the next round
    page.send()
    assert page.op == ReadResults("batch_1", "output", 2, 2)
    page.send(([result_line("late")], {"x-next-line": "3", "x-batch-status": "completed"}))
    assert page.done and [r.custom_id for r in page.result] == ["late"]
    last = Stepper(follower.next_page())
    assert last.done and last.result is None  # ended and read to its end: no further request
    follower.close()
