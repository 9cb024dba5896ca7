"""Requests are checked when added: the error names the field, and nothing bad reaches the spool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.client.conftest import chat
from vllm_batch import BatchValidationError, Provider, VLLMBatch

LOCAL = "http://batch.test/v1"


@pytest.fixture
def batch(tmp_path: Path):
    with VLLMBatch(base_url=LOCAL, workdir=tmp_path / "work") as b:
        yield b


def spooled(batch: VLLMBatch) -> list[dict]:
    spool = batch._core.spool
    return [json.loads(x) for x in spool.lines()]


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "system"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "no model"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model", "at least 1"),
        ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model", "string"),
        (chat("x", temperature=3), "temperature", "less than or equal"),
        (chat("x", max_tokens=0), "max_tokens", "greater than or equal"),
        (chat("x", stream=True), "stream", "False"),
        ({"model": "m", "prompt": {"a": 1}}, "prompt", "Input should be"),
        ({"model": "m"}, "messages", "cannot tell the endpoint"),
        ({"model": "m", "messages": [], "prompt": "x"}, "prompt", "ambiguous"),
    ],
)
def test_invalid_requests_name_the_field(batch: VLLMBatch, request_, field: str, message: str) -> None:
    with pytest.raises(BatchValidationError, match=message) as info:
        batch.add_to_batch(**request_)
    assert info.value.field == field and info.value.index == 0
    assert field in str(info.value)
    assert len(batch) == 0


def test_endpoint_inference(tmp_path: Path) -> None:
    cases = [
        (chat("x"), None, "/v1/chat/completions"),
        ({"model": "m", "prompt": "x"}, None, "/v1/completions"),
        ({"model": "m", "input": ["a", "b"]}, None, "/v1/embeddings"),
        ({"model": "m", "input": "x"}, "/v1/responses", "/v1/responses"),
        ({"model": "m", "input": "x"}, "responses", "/v1/responses"),
    ]
    for n, (request, endpoint, expected) in enumerate(cases):
        with VLLMBatch(base_url=LOCAL, workdir=tmp_path / str(n)) as b:
            b.add_to_batch(endpoint=endpoint, **request)
            assert spooled(b)[0]["url"] == expected


def test_unknown_endpoint(batch: VLLMBatch) -> None:
    with pytest.raises(BatchValidationError, match="unknown endpoint") as info:
        batch.add_to_batch(endpoint="/v1/images", model="m", prompt="x")
    assert info.value.field == "endpoint"


def test_one_endpoint_per_batch(batch: VLLMBatch) -> None:
    batch.add_to_batch(**chat("x"))
    with pytest.raises(BatchValidationError, match="one endpoint") as info:
        batch.add_to_batch(model="m1", prompt="x")
    assert info.value.field == "endpoint" and info.value.index == 1


def test_a_rejected_request_leaves_no_trace(batch: VLLMBatch) -> None:
    with pytest.raises(BatchValidationError):
        batch.add_to_batch(model="m1", prompt="x", temperature=9)
    # The rejected completion request did not fix the endpoint: a chat batch is still possible.
    batch.add_to_batch(**chat("ok"))
    assert len(batch) == 1 and spooled(batch)[0]["url"] == "/v1/chat/completions"


def test_custom_ids_unique_and_generated(batch: VLLMBatch) -> None:
    assert batch.add_to_batch(**chat("a")) == "request-0"
    assert batch.add_to_batch(custom_id="request-2", **chat("b")) == "request-2"
    # The generated id for line 2 is taken by the user's: the next free variant is used.
    assert batch.add_to_batch(**chat("c")) == "request-2.1"
    with pytest.raises(BatchValidationError, match=r"duplicate custom_id 'request-2' .*request at index 1") as info:
        batch.add_to_batch(custom_id="request-2", **chat("d"))
    assert info.value.field == "custom_id"
    with pytest.raises(BatchValidationError, match="non-empty string"):
        batch.add_to_batch(custom_id="", **chat("d"))
    assert [line["custom_id"] for line in spooled(batch)] == ["request-0", "request-2", "request-2.1"]


def test_custom_id_in_the_request_dict_is_taken_out_of_the_body(batch: VLLMBatch) -> None:
    batch.add_requests([chat("a", custom_id="x1")])
    [line] = spooled(batch)
    assert line["custom_id"] == "x1" and "custom_id" not in line["body"]


def test_one_model_per_batch_unless_the_provider_mixes(tmp_path: Path) -> None:
    with VLLMBatch(base_url=LOCAL, workdir=tmp_path / "a") as b:
        b.add_to_batch(**chat("x", model="m1"))
        with pytest.raises(BatchValidationError, match="one model per batch") as info:
            b.add_to_batch(**chat("x", model="m2"))
        assert info.value.field == "model"
    mixing = Provider("mix", LOCAL, mixed_models=True)
    with VLLMBatch(provider=mixing, workdir=tmp_path / "b") as b:
        b.add_to_batch(**chat("x", model="m1"))
        b.add_to_batch(**chat("x", model="m2"))
        assert b.models == ["m1", "m2"]


def test_provider_endpoints_are_enforced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARASAIL_API_KEY", "k")
    with VLLMBatch(provider="parasail", workdir=tmp_path) as b, \
            pytest.raises(BatchValidationError, match="parasail does not offer /v1/responses"):
        b.add_to_batch(endpoint="/v1/responses", model="m", input="x")


def test_embeddings_encoding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with VLLMBatch(base_url=LOCAL, workdir=tmp_path / "a") as b:
        b.add_to_batch(model="e", input="x")
        b.add_to_batch(model="e", input="y", encoding_format="float")
        assert [x["body"].get("encoding_format") for x in spooled(b)] == ["base64", "float"]
    monkeypatch.setenv("PARASAIL_API_KEY", "k")
    with VLLMBatch(provider="parasail", workdir=tmp_path / "b") as b:
        b.add_to_batch(model="e", input="x")
        assert "encoding_format" not in spooled(b)[0]["body"]


def test_a_line_larger_than_a_whole_batch_file(tmp_path: Path) -> None:
    with VLLMBatch(base_url=LOCAL, max_bytes=200, workdir=tmp_path) as b:
        b.add_to_batch(**chat("small"))
        with pytest.raises(BatchValidationError, match="over") as info:
            b.add_to_batch(**chat("x" * 300))
        assert info.value.field == "body"
        with pytest.raises(BatchValidationError, match="over"):
            b.add_to_batch(custom_id="big", **chat("x" * 300))
        # The refused generated id was released again.
        assert b.add_to_batch(**chat("fits")) == "request-1"


def test_from_jsonl_reports_the_bad_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("a")) + "\n{oops\n")
    with pytest.raises(BatchValidationError, match=r"in.jsonl, line 2: not JSON"):
        VLLMBatch.from_jsonl(src, base_url=LOCAL)


def test_validation_happens_when_added_not_at_submit(tmp_path: Path) -> None:
    requests = [chat("a"), chat("b"), {"model": "m1", "messages": [{"role": "user"}], "n": 0}]
    with pytest.raises(BatchValidationError) as info:
        VLLMBatch.from_requests(requests, base_url=LOCAL)
    assert info.value.index == 2 and info.value.field == "n"


def test_scratch_files_are_removed(tmp_path: Path) -> None:
    import gc

    batch = VLLMBatch(base_url=LOCAL)
    batch.add_to_batch(**chat("x"))
    scratch = batch._core.workdir
    assert (scratch / "requests.jsonl").exists()
    batch.close()
    assert not scratch.exists()
    dropped = VLLMBatch(base_url=LOCAL)
    dropped.add_to_batch(**chat("x"))
    scratch = dropped._core.workdir
    del dropped
    gc.collect()
    assert not scratch.exists()
    # A workdir the caller chose is theirs: kept, and reusing it starts a fresh batch.
    for _ in range(2):
        with VLLMBatch(base_url=LOCAL, workdir=tmp_path / "mine") as batch:
            assert batch.add_to_batch(custom_id="same", **chat("x")) == "same"
            assert len(spooled(batch)) == 1
    assert (tmp_path / "mine" / "requests.jsonl").exists()


def test_score_rerank_and_responses_requests(tmp_path: Path) -> None:
    cases = [
        ({"model": "e", "query": "q", "documents": ["a", "b"], "top_n": 1}, None, "/v1/rerank"),
        ({"model": "e", "queries": "q", "documents": ["a", "b"]}, None, "/v1/score"),
        ({"model": "e", "text_1": ["q"], "text_2": ["a"]}, None, "/v1/score"),
        ({"model": "e", "data_1": "q", "data_2": "a"}, "score", "/v1/score"),
        ({"model": "m", "input": [{"role": "user", "content": "x"}]}, "responses", "/v1/responses"),
    ]
    for n, (request, endpoint, expected) in enumerate(cases):
        with VLLMBatch(base_url=LOCAL, workdir=tmp_path / str(n)) as b:
            b.add_to_batch(endpoint=endpoint, **request)
            assert spooled(b)[0]["url"] == expected
    bad = [
        ({"model": "e", "query": "q", "documents": []}, "documents", "at least 1"),
        ({"model": "e", "query": "q", "documents": ["a"], "top_n": -1}, "top_n", "greater than or equal"),
        ({"model": "e", "queries": "q"}, None, "'documents' must be"),
        ({"model": "e", "queries": [], "documents": ["a"]}, None, "'queries' must be"),
        ({"model": "e", "query": "q", "documents": ["a"], "messages": []}, "query", "ambiguous"),
    ]
    for request, field, message in bad:
        with VLLMBatch(base_url=LOCAL, workdir=tmp_path / "bad") as b, \
                pytest.raises(BatchValidationError, match=message) as info:
            b.add_to_batch(**request)
        assert info.value.field == field
    with VLLMBatch(base_url="https://api.openai.com/v1", api_key="k", workdir=tmp_path / "oa") as b, \
            pytest.raises(BatchValidationError, match="openai does not offer /v1/rerank"):
        b.add_to_batch(model="e", query="q", documents=["a"])


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"temperature": True}, "temperature", "valid number"),
        ({"temperature": float("nan")}, "temperature", "finite number"),
        ({"top_p": float("inf")}, "top_p", "finite number"),
        ({"max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"max_tokens": 10.0}, "max_tokens", "valid integer"),
        ({"n": False}, "n", "valid integer"),
    ],
)
def test_numbers_must_be_numbers_not_strings_or_bools(batch: VLLMBatch, params: dict, field: str,
                                                     message: str) -> None:
    with pytest.raises(BatchValidationError, match=message) as info:
        batch.add_to_batch(**chat("x", **params))
    assert info.value.field == field
    assert spooled(batch) == []


def test_a_value_json_cannot_carry_is_refused(batch: VLLMBatch) -> None:
    with pytest.raises(BatchValidationError, match="not valid JSON"):
        batch.add_to_batch(**chat("x", logit_bias={"1": float("nan")}))
    with pytest.raises(BatchValidationError, match="not valid JSON"):
        batch.add_to_batch(**chat("x", extra=object()))
    assert batch.add_to_batch(**chat("ok")) == "request-0"  # nothing of the refused ones was kept


def test_endpoint_or_url_keys_of_a_row_choose_the_endpoint_and_leave_the_body(tmp_path: Path) -> None:
    rows = [{"endpoint": "/v1/completions", "model": "m1", "prompt": "a"},
            {"url": "completions", "model": "m1", "prompt": "b", "custom_id": "mine"}]
    with VLLMBatch.from_requests(rows, base_url=LOCAL, workdir=tmp_path / "work") as batch:
        lines = spooled(batch)
    assert [line["url"] for line in lines] == ["/v1/completions", "/v1/completions"]
    assert [line["body"] for line in lines] == [{"model": "m1", "prompt": "a"}, {"model": "m1", "prompt": "b"}]
    assert lines[1]["custom_id"] == "mine"


def test_a_bare_jsonl_body_may_name_its_endpoint(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"endpoint": "embeddings", "model": "e", "input": "hi"}) + "\n")
    with VLLMBatch.from_jsonl(src, base_url=LOCAL, workdir=tmp_path / "work") as batch:
        [line] = spooled(batch)
    assert line["url"] == "/v1/embeddings" and "endpoint" not in line["body"]


def test_an_endpoint_key_that_contradicts_the_argument_is_refused(batch: VLLMBatch) -> None:
    with pytest.raises(BatchValidationError, match="contradicts"):
        batch.add_requests([{"endpoint": "/v1/embeddings", "url": "/v1/completions", "model": "m", "input": "x"}])


def test_jsonl_errors_count_lines_from_one_like_the_file(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("a", custom_id="a")) + "\n\n" + json.dumps(chat("b", temperature=9)) + "\n")
    with pytest.raises(BatchValidationError) as info:
        VLLMBatch.from_jsonl(src, base_url=LOCAL)
    assert info.value.line == 3 and info.value.index == 1 and info.value.field == "temperature"
    assert str(info.value).startswith(f"{src}, line 3, field 'temperature': ")
    src.write_text(json.dumps(chat("a", custom_id="a")) + "\n" + json.dumps(chat("b", custom_id="a")) + "\n")
    with pytest.raises(BatchValidationError, match="line 2, field 'custom_id': duplicate custom_id 'a' "
                                                   r"\(first used on line 1\)"):
        VLLMBatch.from_jsonl(src, base_url=LOCAL)
