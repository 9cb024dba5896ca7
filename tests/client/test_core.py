"""The pure parts of the core: status combination, the polling schedule, result-line parsing."""

from __future__ import annotations

import array
import base64

import httpx
import pytest
import respx

from tests.client.conftest import chat
from vllm_batch import AsyncVLLMBatch, RetryPolicy
from vllm_batch._core import PollSchedule, combine_status
from vllm_batch._results import decode_embedding, parse_result_line


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["completed", "completed"], "completed"),
        (["completed", "failed"], "failed"),
        (["cancelled", "completed"], "cancelled"),
        (["expired", "completed"], "expired"),
        (["failed", "cancelled"], "failed"),
        (["completed", "in_progress"], "in_progress"),
        (["validating", "validating"], "validating"),
        (["validating", "in_progress"], "in_progress"),
        (["completed", "finalizing"], "finalizing"),
        (["cancelling", "completed"], "cancelling"),
    ],
)
def test_combine_status(statuses: list[str], expected: str) -> None:
    assert combine_status(statuses) == expected


def test_poll_schedule_backs_off_and_speeds_up() -> None:
    schedule = PollSchedule(max_interval=10.0)
    idle = [schedule.next(progressed=False) for _ in range(10)]
    assert idle[0] == 0.75 and idle == sorted(idle) and idle[-1] == 10.0
    moving = [schedule.next(progressed=True) for _ in range(10)]
    assert moving == sorted(moving, reverse=True) and moving[-1] == 0.5
    assert PollSchedule(max_interval=0.2).next(False) == 0.2  # never beyond the caller's interval


def test_parse_result_line_shapes() -> None:
    ok = parse_result_line({"custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": {"x": 1}},
                            "error": None})
    assert ok == ({"x": 1}, None, 200, "r")
    body, err, status, _ = parse_result_line({"custom_id": "a", "response": {
        "status_code": 500, "body": {"error": {"message": "boom", "type": "server_error"}}}, "error": None})
    assert body is None and status == 500 and err.code == "server_error" and err.message == "boom"
    _, err, status, _ = parse_result_line({"custom_id": "a", "response": None,
                                           "error": {"code": "batch_expired", "message": "late"}})
    assert status is None and (err.code, err.message) == ("batch_expired", "late")
    _, err, _, _ = parse_result_line({"custom_id": "a"})
    assert err.code == "invalid_result"


def test_decode_embedding_round_trip() -> None:
    values = [1.0, -0.5, 0.125]
    assert decode_embedding(base64.b64encode(array.array("f", values).tobytes()).decode()) == values
    assert decode_embedding(values) is values


@pytest.mark.anyio
async def test_async_client_keeps_keys_to_their_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret")
    with respx.mock() as router:
        upload = router.post("http://other.test/v1/files").mock(
            return_value=httpx.Response(500, json={"error": {"message": "stop"}}))
        async with AsyncVLLMBatch(base_url="http://other.test/v1", retry=RetryPolicy(max_attempts=1)) as batch:
            batch.add_to_batch(**chat("x"))
            with pytest.raises(Exception, match="stop"):
                await batch.submit()
        headers = upload.calls.last.request.headers
    assert upload.called
    assert "authorization" not in headers and "openai-organization" not in headers
