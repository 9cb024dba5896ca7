"""Result lines: an answer the engine already serialized (vLLM's embeddings, scores, reranks) is written as it
came, and the line is the one serializing the parsed body would have written."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vllm_batch_server.engines.base import Result, Usage
from vllm_batch_server.queue.checkpoint import result_line
from vllm_batch_server.store.jsonl import custom_id_of

BODY: dict[str, Any] = {
    "id": "embd-1", "object": "list", "created": 1, "model": "all-minilm-l6-v2",
    "data": [{"index": 0, "object": "embedding", "embedding": [0.125, -1e-05, 3.0, 0.30000000000000004]}],
    "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0, "prompt_tokens_details": None},
}


def compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def without_ids(line: bytes) -> dict[str, Any]:
    parsed = json.loads(line)
    assert parsed["id"].startswith("batch_req_") and parsed["response"]["request_id"].startswith("batch_req_")
    parsed["id"] = parsed["response"]["request_id"] = "-"
    return dict(parsed)


def ids_blanked(line: bytes) -> bytes:
    parsed = json.loads(line)
    return line.replace(parsed["id"].encode(), b"-").replace(parsed["response"]["request_id"].encode(), b"-")


@pytest.mark.parametrize("custom_id", ["plain", 'quote " and \\ back', "accents é and 日本", "line\nbreak"])
def test_a_line_with_the_engines_json_is_the_line_from_the_parsed_body(custom_id: str) -> None:
    spliced = result_line(custom_id, Result(200, BODY, Usage(3), raw=compact(BODY)))
    parsed = result_line(custom_id, Result(200, BODY, Usage(3)))
    assert spliced.endswith(b"\n") and spliced.count(b"\n") == 1  # one JSONL line
    assert without_ids(spliced) == without_ids(parsed) == {
        "id": "-", "custom_id": custom_id, "error": None,
        "response": {"status_code": 200, "request_id": "-", "body": BODY}}
    assert custom_id_of(spliced) == custom_id  # what a resume reads back
    assert ids_blanked(spliced) == ids_blanked(parsed)  # byte for byte, apart from the two fresh ids


def test_the_engines_json_is_written_as_it_came() -> None:
    raw = b'{"object":"list","data":[{"embedding":[1.0E-5]}],"usage":{"prompt_tokens":3}}'
    line = result_line("x", Result(200, json.loads(raw), Usage(3), raw=raw))
    assert raw + b'},"error":null}\n' in line  # 1.0E-5 stays as the engine wrote it


def test_the_vllm_engine_keeps_the_json_of_a_whole_answer_only() -> None:
    from starlette.responses import JSONResponse

    from vllm_batch_server.engines.vllm import VLLMEngine

    answer = JSONResponse(BODY)
    assert VLLMEngine._body_of(answer) == (BODY, answer.body)
    assert VLLMEngine._body_of(JSONResponse({"error": {"code": 400}}, status_code=400)) == ({"error": {"code": 400}},
                                                                                            None)
    pretty = JSONResponse(BODY)
    pretty.body = json.dumps(BODY, indent=1).encode()  # more than one line: not a JSONL line's part
    assert VLLMEngine._body_of(pretty) == (BODY, None)


def test_the_vllm_engine_reads_the_engines_json_as_json_does() -> None:
    """Read with msgspec (ten times json.loads on an embedding's floats), the body is the one json.loads gives,
    floats to the last bit; what msgspec refuses is read by json (NaN, never in vLLM's own JSON)."""
    import random

    from starlette.responses import JSONResponse

    from vllm_batch_server.engines.vllm import VLLMEngine, _loads

    rng = random.Random(7)
    body = {**BODY, "data": [{"index": 0, "object": "embedding",
                              "embedding": [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 3) for _ in range(384)]}]}
    answer = JSONResponse(body)
    parsed, raw = VLLMEngine._body_of(answer)
    assert parsed == json.loads(answer.body) == body and raw == answer.body
    odd = _loads(b'{"x":NaN,"n":12345678901234567890123}')
    assert odd["x"] != odd["x"] and odd["n"] == 12345678901234567890123
    with pytest.raises(ValueError):
        _loads(b'{"x":')
