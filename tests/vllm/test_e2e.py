"""End to end through the official openai SDK: real server, real vLLM, the two embedded models."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from typing import Any

import pytest

from tests.conftest import read_jsonl
from tests.vllm.conftest import (
    CHAT_MODEL,
    COMPLETION_PROMPTS,
    EMBED_MODEL,
    EMBED_TEXTS,
    MAX_TOKENS,
    OPTION_LINES,
    QUESTIONS,
    SYSTEM_PROMPT,
    BackToBack,
    chat_messages,
)

pytestmark = pytest.mark.vllm


def _by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


def test_chat_batch_completes_with_real_answers(back_to_back: BackToBack) -> None:
    from transformers import AutoTokenizer

    from vllm_batch_server.engines.model_files import resolve

    b = back_to_back
    assert b.chat.status == "completed", b.chat
    assert b.chat.request_counts.total == len(QUESTIONS) + 2 + len(OPTION_LINES)
    assert b.chat.request_counts.completed == len(QUESTIONS) + len(OPTION_LINES)
    assert b.chat.request_counts.failed == 2
    out = _by_id(read_jsonl(b.client, b.chat.output_file_id))
    assert set(out) == {f"chat-{i}" for i in range(len(QUESTIONS))} | set(OPTION_LINES)

    tokenizer = AutoTokenizer.from_pretrained(resolve(CHAT_MODEL, _cache()).path)
    for i, question in enumerate(QUESTIONS):
        response = out[f"chat-{i}"]["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == CHAT_MODEL
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        content = choice["message"]["content"]
        assert isinstance(content, str) and content.strip(), body
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        # The server counted the prompt as the model's own chat template and tokenizer do.
        encoded: Any = tokenizer.apply_chat_template(chat_messages(question, SYSTEM_PROMPT),
                                                     add_generation_prompt=True, tokenize=True, return_dict=True)
        assert usage["prompt_tokens"] == len(encoded["input_ids"]), (question, usage)
        assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
        if choice["finish_reason"] == "length":
            assert usage["completion_tokens"] == MAX_TOKENS
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)
        # Re-tokenizing the answer gives about as many tokens as were generated (the EOS is not text).
        assert abs(len(tokenizer.encode(content, add_special_tokens=False)) - usage["completion_tokens"]) <= 2

    # Every prompt starts with the same long system prompt: prefix caching (on by default) serves it from
    # the KV cache to the requests scheduled after the first.
    cached = [out[f"chat-{i}"]["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for i in range(len(QUESTIONS))]
    assert max(cached) > 0, cached


def test_request_options_are_honoured(back_to_back: BackToBack) -> None:
    b = back_to_back
    out = _by_id(read_jsonl(b.client, b.chat.output_file_id))

    body = out["opt-logprobs"]["response"]["body"]
    logprobs = body["choices"][0]["logprobs"]["content"]
    assert len(logprobs) == body["usage"]["completion_tokens"]
    for entry in logprobs:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] >= max(t["logprob"] for t in entry["top_logprobs"]) - 1e-5

    # json_schema goes to vLLM's structured outputs: the answer parses and follows the schema.
    answer = json.loads(out["opt-schema"]["response"]["body"]["choices"][0]["message"]["content"])
    assert set(answer) == {"color"} and answer["color"] in ("red", "green", "blue")

    choices = out["opt-n2"]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["content"] for c in choices)

    stopped = out["opt-stop"]["response"]["body"]
    assert " " not in stopped["choices"][0]["message"]["content"].strip()
    assert stopped["usage"]["completion_tokens"] <= 12


def test_completions_batch(back_to_back: BackToBack) -> None:
    b = back_to_back
    assert b.completions.status == "completed", b.completions
    assert b.completions.request_counts.completed == len(COMPLETION_PROMPTS)
    out = _by_id(read_jsonl(b.client, b.completions.output_file_id))
    for i in range(len(COMPLETION_PROMPTS)):
        body = out[f"cmpl-{i}"]["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == CHAT_MODEL
        choice = body["choices"][0]
        assert choice["text"] and choice["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 8
    logprobs = out["cmpl-0"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert "".join(logprobs["tokens"]) == out["cmpl-0"]["response"]["body"]["choices"][0]["text"]


def test_bad_lines_land_in_the_error_file_alone(back_to_back: BackToBack) -> None:
    b = back_to_back
    errors = _by_id(read_jsonl(b.client, b.chat.error_file_id))
    assert set(errors) == {"too-long", "unsupported"}
    too_long = errors["too-long"]["response"]
    assert too_long["status_code"] == 400
    assert "maximum context length" in too_long["body"]["error"]["message"]
    unsupported = errors["unsupported"]["response"]
    assert unsupported["status_code"] == 400
    assert unsupported["body"]["error"]["param"] == "prediction"
    assert "unsupported parameter" in unsupported["body"]["error"]["message"]


def test_embeddings_are_unit_vectors_in_both_encodings(back_to_back: BackToBack) -> None:
    from transformers import AutoTokenizer

    from vllm_batch_server.engines.model_files import resolve

    b = back_to_back
    assert b.embed.status == "completed", b.embed
    assert b.embed.request_counts.completed == 2 * len(EMBED_TEXTS) and b.embed.request_counts.failed == 0
    out = _by_id(read_jsonl(b.client, b.embed.output_file_id))
    tokenizer = AutoTokenizer.from_pretrained(resolve(EMBED_MODEL, _cache()).path)
    for i, text in enumerate(EMBED_TEXTS):
        plain = out[f"emb-{i}"]["response"]["body"]
        encoded = out[f"emb64-{i}"]["response"]["body"]
        assert plain["object"] == "list" and plain["model"] == EMBED_MODEL
        vector = plain["data"][0]["embedding"]
        assert len(vector) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-4)
        # base64 is the float32 little-endian bytes of the same vector.
        raw = base64.b64decode(encoded["data"][0]["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert len(decoded) == 384
        assert all(math.isclose(a, c, abs_tol=1e-6) for a, c in zip(vector, decoded, strict=True))
        assert plain["usage"]["prompt_tokens"] == len(tokenizer(text)["input_ids"])
        assert encoded["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    # Similar sentences are closer than unrelated ones: the vectors mean something.
    first = out["emb-0"]["response"]["body"]["data"][0]["embedding"]
    second = out["emb-1"]["response"]["body"]["data"][0]["embedding"]
    third = out["emb-2"]["response"]["body"]["data"][0]["embedding"]
    assert sum(a * c for a, c in zip(first, second, strict=True)) > sum(
        a * c for a, c in zip(first, third, strict=True))


def test_back_to_back_batches_switch_models(back_to_back: BackToBack) -> None:
    b = back_to_back
    assert b.chat.status == "completed" and b.embed.status == "completed"
    assert b.completions.status == "completed"
    # One model at a time, in queue order: the embeddings batch ran after the two batches for the chat
    # model, on a newly loaded engine.
    assert b.chat.completed_at is not None and b.completions.completed_at is not None
    assert b.embed.completed_at is not None
    assert b.embed.completed_at >= max(b.chat.completed_at, b.completions.completed_at)
    log = b.server.log_path.read_text(errors="replace")
    assert f"vLLM loaded {CHAT_MODEL}" in log
    assert f"vLLM loaded {EMBED_MODEL}" in log
    assert log.index(f"vLLM loaded {CHAT_MODEL}") < log.index(f"vLLM loaded {EMBED_MODEL}")
    # vLLM is imported once, from the engine's construction at start, not by the first load (which then waits
    # for that import, if the first batch came sooner, instead of running its own).
    assert log.count("vLLM imported ahead of the first model load") == 1
    # Each load takes what is alive out of the garbage collector's full collections, and says how much. (That
    # the switch gives the first model's objects back first is test_engine_config.py's: a count cannot tell.)
    frozen = [int(n) for n in re.findall(r"(\d+) objects frozen out of garbage collection", log)]
    assert len(frozen) == 2 and all(n > 100_000 for n in frozen), frozen
    assert frozen[1] < 1.5 * frozen[0], frozen


def _cache() -> Any:
    from vllm_batch_server.settings import default_cache_dir

    return default_cache_dir()
