"""What the engine asks of the installed vLLM release, checked without a device (`nox -s vllm-compat -- VERSION`).

Run against each supported release's CUDA build on a CPU-only machine: nothing here starts an engine, so a pass
says the names, arguments and request classes fit; it does not say a model runs on that release's GPU build.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from vllm_batch_server.engines import model_files, vllm_compat
from vllm_batch_server.engines.base import CHAT, COMPLETIONS, EMBEDDINGS, RERANK, RESPONSES, SCORE, Result
from vllm_batch_server.engines.vllm import VLLMEngine, _Serving
from vllm_batch_server.settings import Settings


def test_the_release_is_in_the_supported_range() -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = vllm_compat.version()
    print(f"vLLM {version}")
    assert Version(version) in SpecifierSet(vllm_compat.SUPPORTED), version


@pytest.mark.parametrize("name", sorted(vllm_compat.WHERE))
def test_every_name_the_engine_and_benchmarks_use_resolves(name: vllm_compat.Name) -> None:
    assert vllm_compat.load(name) is not None


@pytest.fixture
def engine(model_cache: Path) -> VLLMEngine:
    return VLLMEngine(Settings(model_cache_dir=model_cache, max_model_len=2048, max_num_seqs=16,
                               engine_args={"seed": 7}))


@pytest.mark.parametrize("model", [model_files.SMOLLM2, model_files.MINILM])
def test_engine_arguments_build_as_vllm_serve_would(engine: VLLMEngine, model_cache: Path, model: str) -> None:
    resolved = model_files.resolve(model, model_cache)
    engine_args, frontend = engine._build_args(resolved)
    assert isinstance(engine_args, vllm_compat.load("AsyncEngineArgs"))
    assert engine_args.model == resolved.path and engine_args.seed == 7
    assert engine_args.runner == ("generate" if model == model_files.SMOLLM2 else "pooling")
    assert isinstance(frontend, Namespace) and frontend.model == resolved.path
    assert frontend.served_model_name == [model] and frontend.enable_prompt_tokens_details is True
    # What init_app_state reads from the frontend namespace besides the engine's own fields.
    for name in ("tool_call_parser", "chat_template", "response_role", "enable_auto_tool_choice"):
        assert hasattr(frontend, name), name


def test_unknown_engine_argument_is_refused_by_name(model_cache: Path) -> None:
    from vllm_batch_server.engines.base import EngineError

    engine = VLLMEngine(Settings(model_cache_dir=model_cache, engine_args={"no_such_knob": 1}))
    with pytest.raises(EngineError, match="no_such_knob"):
        engine._build_args(model_files.resolve(model_files.SMOLLM2, model_cache))


@pytest.mark.parametrize("model", [model_files.SMOLLM2, model_files.MINILM])
def test_the_model_config_parses(engine: VLLMEngine, model_cache: Path, model: str) -> None:
    """The part of `create_engine_config` that needs no device: vLLM reads the model folder's config and derives
    the context length and the runner (the rest of it asks the platform for a device)."""
    engine_args, _ = engine._build_args(model_files.resolve(model, model_cache))
    model_config = engine_args.create_model_config()
    assert model_config.max_model_len == (2048 if model == model_files.SMOLLM2 else 256)
    assert model_config.runner_type == ("generate" if model == model_files.SMOLLM2 else "pooling")


def test_engine_and_serving_entry_points_keep_their_shape() -> None:
    """The calls `start` makes into vLLM: AsyncLLM.from_vllm_config's keywords, the usage context, the engine
    client's methods, init_app_state's parameters."""
    async_llm = vllm_compat.load("AsyncLLM")
    parameters = inspect.signature(async_llm.from_vllm_config).parameters
    for name in ("vllm_config", "usage_context", "enable_log_requests", "disable_log_stats"):
        assert name in parameters, name
    for name in ("get_supported_tasks", "reset_mm_cache", "check_health", "shutdown", "errored"):
        assert hasattr(async_llm, name), name
    assert vllm_compat.load("UsageContext").OPENAI_BATCH_RUNNER
    assert list(inspect.signature(vllm_compat.load("init_app_state")).parameters)[:4] == [
        "engine_client", "state", "args", "supported_tasks"]


def test_init_app_state_still_sets_the_serving_objects_the_engine_reads() -> None:
    """`_Serving` reads five attributes of the state init_app_state fills; vLLM sets them in its routers' and
    factories' modules. Their assignments must still be in the release's frontend source."""
    import vllm

    source = "\n".join(p.read_text(errors="replace") for p in
                       (Path(vllm.__file__).parent / "entrypoints").rglob("*.py"))
    read = inspect.getsource(_Serving.__init__)
    attributes = [a for a in ("openai_serving_chat", "openai_serving_completion", "serving_embedding",
                              "openai_serving_responses", "serving_scores") if f'"{a}"' in read]
    assert len(attributes) == 5
    for attribute in attributes:
        assert f"state.{attribute} =" in source, attribute
    for method in ("create_chat_completion", "create_completion", "create_responses"):
        assert f"def {method}(" in source, method


# One body per endpoint, with the fields users send most.
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 8, "n": 2, "stop": ["\n"], "seed": 1,
           "logprobs": True, "top_logprobs": 2, "logit_bias": {"42": 1.0}, "metadata": {"team": "a"},
           "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
           "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
           "tool_choice": "auto", "top_k": 5, "user": "u1"},
    COMPLETIONS: {"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.0, "echo": False,
                  "logprobs": 2, "best_of": 1, "stop": "."},
    EMBEDDINGS: {"model": "m", "input": ["a cat", "a dog"], "encoding_format": "base64", "dimensions": None},
    RESPONSES: {"model": "m", "input": [{"role": "user", "content": "hi"}], "instructions": "Be brief.",
                "max_output_tokens": 5, "temperature": 0.2, "store": False, "metadata": {"a": "b"}},
    SCORE: {"model": "m", "queries": "a pet", "documents": ["a cat", "stock prices"]},
    RERANK: {"model": "m", "query": "a pet", "documents": ["a cat", "stock prices"], "top_n": 1},
}


@pytest.mark.parametrize("url", list(BODIES))
def test_a_body_of_every_endpoint_parses_with_the_release_s_request_class(engine: VLLMEngine, url: str) -> None:
    engine._priority_scheduling = True  # as start() records it from an engine scheduling by priority
    body = {k: v for k, v in BODIES[url].items() if v is not None}
    parsed = engine._parse("req-1", url, body, 1_086_400)
    assert not isinstance(parsed, Result), parsed.body
    assert parsed.request_id == "req-1" and parsed.priority == 1_086_400
    if url == CHAT:
        assert parsed.n == 2 and parsed.max_completion_tokens == 8 and parsed.top_k == 5
    # Extra fields still fail alone with a 400 naming them, whatever fields the release added.
    refused = engine._parse("req-1", url, {**body, "frobnicate": 1})
    assert isinstance(refused, Result) and refused.status_code == 400
    assert refused.body["error"]["param"] == "frobnicate"


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS, RESPONSES])
def test_streaming_bodies_parse(engine: VLLMEngine, url: str) -> None:
    body = {**BODIES[url], "stream_options": {"include_usage": True}} if url != RESPONSES else dict(BODIES[url])
    parsed = engine._parse("req-1", url, body, streaming=True)
    assert not isinstance(parsed, Result), parsed.body
    assert parsed.stream is True


def test_vllm_s_own_validation_errors_are_a_400_naming_the_parameter(engine: VLLMEngine) -> None:
    """A request vLLM's validators refuse (tool_choice without tools) fails alone, as `vllm serve` answers it,
    through the release's create_error_response."""
    refused = engine._parse("req-1", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                            "tool_choice": "required"})
    assert isinstance(refused, Result) and refused.status_code == 400, refused


def test_score_and_embedding_request_unions_have_the_shape_the_engine_unpacks() -> None:
    score = vllm_compat.load("ScoreRequest")
    assert [m for m in typing.get_args(score) if hasattr(m, "model_fields")]
    embedding = vllm_compat.load("EmbeddingRequest")
    members = [m for m in typing.get_args(typing.get_args(embedding)[0]) if hasattr(m, "model_fields")]
    assert members, embedding
    assert dataclasses.is_dataclass(vllm_compat.load("AsyncEngineArgs"))
