"""Batches whose input is wrong end `failed` with errors naming the line, the parameter and a code."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import AppFactory, chat_lines, jsonl, request_line, sdk, submit, wait_for
from vllm_batch_server.queue import custom_ids


def _failed(client: openai.OpenAI, data: bytes, endpoint: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    batch = wait_for(client, submit(client, data, endpoint=endpoint).id)
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.in_progress_at is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors is not None and batch.errors.object == "list"
    return [e.model_dump() for e in batch.errors.data or []]


GOOD = json.dumps(request_line("a")).encode()
CASES = {
    "invalid JSON": (b'{"custom_id": "b", "method": "POST",', 2, None, "invalid_json_line"),
    "not an object": (b"[1, 2, 3]", 2, None, "invalid_json_line"),
    "invalid UTF-8": (b'{"custom_id": "\xff\xfe"}', 2, None, "invalid_json_line"),
    "NaN": (json.dumps(request_line("b", temperature=float("nan"))).encode(), 2, None, "invalid_json_line"),
    "missing custom_id": (json.dumps({k: v for k, v in request_line("b").items() if k != "custom_id"}).encode(),
                          2, "custom_id", "missing_required_parameter"),
    "duplicate custom_id": (GOOD, 2, "custom_id", "duplicate_custom_id"),
    "GET method": (json.dumps({**request_line("b"), "method": "GET"}).encode(), 2, "method", "invalid_method"),
    "url not the endpoint": (json.dumps(request_line("b", url="/v1/completions")).encode(), 2, "url",
                             "invalid_url"),
    "missing body": (json.dumps({k: v for k, v in request_line("b").items() if k != "body"}).encode(), 2,
                     "body", "missing_required_parameter"),
    "missing model": (json.dumps({**request_line("b"), "body": {"messages": []}}).encode(), 2, "body.model",
                      "missing_required_parameter"),
    "unserved model": (json.dumps(request_line("b", model="gpt-17")).encode(), 2, "body.model",
                       "model_not_found"),
    "mixed models": (json.dumps(request_line("b", model="echo-embed")).encode(), 2, "body.model",
                     "mismatched_model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_line_problem_fails_the_batch_naming_its_line(client: openai.OpenAI, case: str) -> None:
    bad, line, param, code = CASES[case]
    errors = _failed(client, GOOD + b"\n" + bad + b"\n" + GOOD.replace(b'"a"', b'"c"') + b"\n")
    assert [(e["line"], e["param"], e["code"]) for e in errors] == [(line, param, code)]
    assert errors[0]["message"]


def test_line_numbers_count_blank_lines_and_several_errors_are_reported(client: openai.OpenAI) -> None:
    lines = [json.dumps(request_line(f"r{i}")).encode() for i in range(3)]
    data = b"\n".join([lines[0], b"", b"not json", lines[1], json.dumps(request_line("r0")).encode()]) + b"\n"
    errors = _failed(client, data)
    assert [(e["line"], e["code"]) for e in errors] == [(3, "invalid_json_line"), (5, "duplicate_custom_id")]
    assert "'r0' on line 5 is already used on line 1" in errors[1]["message"]


def test_ids_whose_hashes_collide_are_no_duplicates_and_real_duplicates_still_name_both_lines(
        client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Duplicates are found by hash and confirmed by the ids themselves: with a hash on which every id of the
    same length collides (a test seam), distinct ids still pass and repeated ones are still refused."""
    monkeypatch.setattr(custom_ids, "custom_id_hash", len)
    lines = chat_lines(30)  # req-0 ... req-29: two hashes for 30 ids
    batch = wait_for(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 30
    repeated = [*lines, lines[12], lines[3], lines[12]]
    errors = _failed(client, jsonl(repeated))
    assert [(e["line"], e["code"]) for e in errors] == [(31, "duplicate_custom_id"), (32, "duplicate_custom_id"),
                                                        (33, "duplicate_custom_id")]
    assert "'req-12' on line 31 is already used on line 13" in errors[0]["message"]
    assert "'req-3' on line 32 is already used on line 4" in errors[1]["message"]
    assert "'req-12' on line 33 is already used on line 13" in errors[2]["message"]


def test_duplicates_beyond_the_errors_listed_are_cut_in_line_order(app_factory: AppFactory) -> None:
    """More duplicates than `--max-errors-reported`: the first ones by line, mixed with the other errors."""
    client = sdk(app_factory(extra_args=["--max-errors-reported", "3"]))
    lines = [json.dumps(request_line(f"r{i % 2}")).encode() for i in range(6)]
    lines[2] = b"not json"
    errors = _failed(client, b"\n".join(lines) + b"\n")
    assert [(e["line"], e["code"]) for e in errors] == [(3, "invalid_json_line"), (4, "duplicate_custom_id"),
                                                        (5, "duplicate_custom_id")]


def test_empty_file(client: openai.OpenAI) -> None:
    errors = _failed(client, b"\n  \n")
    assert [(e["line"], e["code"]) for e in errors] == [(None, "empty_file")]


def test_more_lines_than_the_maximum(app_factory: AppFactory) -> None:
    client = sdk(app_factory(extra_args=["--max-batch-lines", "10"]))
    assert wait_for(client, submit(client, chat_lines(10)).id).status == "completed"
    errors = _failed(client, jsonl(chat_lines(11)))
    assert [(e["line"], e["code"]) for e in errors] == [(11, "too_many_requests")]


def test_bom_and_crlf_are_accepted(client: openai.OpenAI) -> None:
    data = b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(line).encode() for line in chat_lines(3)) + b"\r\n"
    batch = wait_for(client, submit(client, data).id)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 3


def test_create_batch_refuses_bad_parameters(client: openai.OpenAI) -> None:
    file_id = client.files.create(file=("in.jsonl", jsonl(chat_lines(1))), purpose="batch").id
    other = client.files.create(file=("in.jsonl", jsonl(chat_lines(1))), purpose="user_data").id

    def refused(**params: Any) -> openai.APIStatusError:
        args: dict[str, Any] = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                "completion_window": "24h", **params}
        with pytest.raises(openai.APIStatusError) as caught:
            client.batches.create(**args)
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert set(caught.value.response.json()["error"]) == {"message", "type", "param", "code"}
        return caught.value

    assert refused(input_file_id="file-doesnotexist").status_code == 404
    assert refused(input_file_id=other).body["param"] == "input_file_id"  # type: ignore[index]
    assert refused(endpoint="/v1/images/generations").body["param"] == "endpoint"  # type: ignore[index]
    assert refused(completion_window="forever").body["param"] == "completion_window"  # type: ignore[index]
    assert refused(metadata={f"k{i}": "v" for i in range(17)}).body["param"] == "metadata"  # type: ignore[index]
    assert refused(metadata={"k" * 65: "v"}).status_code == 400
    assert refused(metadata={"k": "v" * 513}).body["param"] == "metadata.k"  # type: ignore[index]
    assert refused(output_expires_after={"anchor": "created_at", "seconds": 5}).status_code == 400
    assert refused(extra_body={"surprise": 1}).body["code"] == "unknown_parameter"  # type: ignore[index]
    # the limits themselves are allowed
    ok = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={f"{i:064d}": "v" * 512 for i in range(16)},
                               output_expires_after={"anchor": "created_at", "seconds": 3600})
    done = wait_for(client, ok.id)
    assert done.status == "completed"
    output = client.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert output.expires_at is not None and output.expires_at - output.created_at == 3600


def test_a_valid_line_nested_1000_deep_is_reported_by_line_with_a_message_about_nesting(
        client: openai.OpenAI) -> None:
    """Valid JSON deeper than the parser follows used to be reported as "not valid JSON"."""
    deep = json.dumps(request_line("b", metadata="DEEP")).encode().replace(b'"DEEP"', b"[" * 1000 + b"]" * 1000)
    data = GOOD + b"\n" + GOOD.replace(b'"a"', b'"c"') + b"\n" + deep + b"\n"
    errors = _failed(client, data)
    assert [(e["line"], e["code"]) for e in errors] == [(3, "invalid_json_line")]
    assert "nested" in errors[0]["message"] and "not valid JSON" not in errors[0]["message"], errors[0]
