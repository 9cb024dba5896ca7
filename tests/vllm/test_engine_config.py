"""What the vLLM engine asks of vLLM and refuses from requests, checked without loading a model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vllm_batch_server.engines.base import CHAT, COMPLETIONS, EMBEDDINGS, EngineError, Result
from vllm_batch_server.settings import Settings

if TYPE_CHECKING:  # imported for real inside the tests: importing vLLM takes seconds
    from vllm_batch_server.engines.vllm import VLLMEngine

pytestmark = pytest.mark.vllm


@pytest.fixture
def engine(model_cache: Path) -> VLLMEngine:
    from vllm_batch_server.engines.vllm import VLLMEngine

    return VLLMEngine(Settings(model_cache_dir=model_cache, max_model_len=4096, max_num_seqs=32,
                               engine_args={"seed": 7}))


def test_cpu_defaults_and_cli_settings_reach_the_engine_arguments(engine: VLLMEngine,
                                                                   model_cache: Path) -> None:
    from vllm_batch_server import models
    from vllm_batch_server.engines.vllm import is_cpu_platform

    kwargs = engine._engine_kwargs(models.resolve(models.SMOLLM2, model_cache))
    assert kwargs["max_model_len"] == 4096 and kwargs["max_num_seqs"] == 32 and kwargs["seed"] == 7
    assert kwargs["served_model_name"] == [models.SMOLLM2] and kwargs["runner"] == "generate"
    assert "enable_prefix_caching" not in kwargs  # vLLM's default: on wherever the model supports it
    if is_cpu_platform():
        assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] is True
    # One --max-model-len for all models: the embedding model's 256-token limit wins for it.
    embed = engine._engine_kwargs(models.resolve(models.MINILM, model_cache))
    assert embed["max_model_len"] == 256 and embed["runner"] == "pooling"
    assert engine.capacity == 64  # 2 x max_num_seqs: keeps vLLM's waiting queue fed


def test_unknown_engine_arg_is_refused_by_name(model_cache: Path) -> None:
    from vllm_batch_server import models
    from vllm_batch_server.engines.vllm import VLLMEngine

    engine = VLLMEngine(Settings(model_cache_dir=model_cache, engine_args={"no_such_knob": 1}))
    with pytest.raises(EngineError, match="no_such_knob"):
        engine._build_args(models.resolve(models.SMOLLM2, model_cache))


@pytest.mark.parametrize(("url", "body", "param"), [
    (CHAT, {"stream": True}, "stream"),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (CHAT, {"functions": [{"name": "f"}]}, "functions"),
    (CHAT, {"temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
    (EMBEDDINGS, {"encoding_format": "bytes"}, "encoding_format"),
    (EMBEDDINGS, {"frobnicate": True}, "frobnicate"),
])
def test_fields_vllm_would_ignore_or_reject_are_a_400_naming_the_field(engine: VLLMEngine, url: str,
                                                                       body: dict[str, Any], param: str) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if url == CHAT else (
        {"model": "m", "prompt": "hi"} if url == COMPLETIONS else {"model": "m", "input": "hi"})
    parsed = engine._parse("req-1", url, {**base, **body})
    assert isinstance(parsed, Result) and parsed.status_code == 400, parsed
    assert parsed.body["error"]["param"] == param, parsed.body


def test_openai_fields_users_rely_on_are_accepted(engine: VLLMEngine) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "top_p": 0.9,
            "max_completion_tokens": 8, "n": 2, "stop": ["\n"], "seed": 1, "presence_penalty": 0.1,
            "frequency_penalty": 0.1, "logit_bias": {"42": 1.0}, "logprobs": True, "top_logprobs": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "metadata": {"team": "a"}, "store": False, "user": "u1"}
    parsed = engine._parse("req-1", CHAT, body)
    assert not isinstance(parsed, Result), parsed.body
    assert parsed.request_id == "req-1" and parsed.n == 2 and parsed.max_completion_tokens == 8
