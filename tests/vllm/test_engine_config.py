"""What the vLLM engine asks of vLLM and refuses from requests, checked without loading a model."""

from __future__ import annotations

import os
import subprocess
import sys
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
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.engines.vllm import is_cpu_platform

    kwargs = engine._engine_kwargs(model_files.resolve(model_files.SMOLLM2, model_cache))
    assert kwargs["max_model_len"] == 4096 and kwargs["max_num_seqs"] == 32 and kwargs["seed"] == 7
    assert kwargs["served_model_name"] == [model_files.SMOLLM2] and kwargs["runner"] == "generate"
    assert "enable_prefix_caching" not in kwargs  # vLLM's default: on wherever the model supports it
    if is_cpu_platform():
        assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] is True
    # One --max-model-len for all models: the embedding model's 256-token limit wins for it.
    embed = engine._engine_kwargs(model_files.resolve(model_files.MINILM, model_cache))
    assert embed["max_model_len"] == 256 and embed["runner"] == "pooling"
    assert engine.capacity == 64  # 2 x max_num_seqs: keeps vLLM's waiting queue fed


def test_unknown_engine_arg_is_refused_by_name(model_cache: Path) -> None:
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.engines.vllm import VLLMEngine

    engine = VLLMEngine(Settings(model_cache_dir=model_cache, engine_args={"no_such_knob": 1}))
    with pytest.raises(EngineError, match="no_such_knob"):
        engine._build_args(model_files.resolve(model_files.SMOLLM2, model_cache))


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


def test_priority_scheduling_and_the_request_priority(engine: VLLMEngine, model_cache: Path) -> None:
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.engines.vllm import VLLMEngine

    chat = model_files.resolve(model_files.SMOLLM2, model_cache)
    assert engine._engine_kwargs(chat)["scheduling_policy"] == "priority"
    fcfs = VLLMEngine(Settings(model_cache_dir=model_cache, priority_scheduling=False))
    assert fcfs._engine_kwargs(chat)["scheduling_policy"] == "fcfs"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    engine._priority_scheduling = True  # as start() records it from the loaded engine's config
    assert engine._parse("r", CHAT, body, 1_086_400).priority == 1_086_400
    engine._priority_scheduling = False  # vLLM refuses a non-zero priority under fcfs: none is sent
    assert engine._parse("r", CHAT, body, 1_086_400).priority == 0


def test_responses_score_and_rerank_bodies_parse_as_vllm_serve_takes_them(engine: VLLMEngine) -> None:
    from vllm_batch_server.engines.base import RERANK, RESPONSES, SCORE

    responses = engine._parse("r", RESPONSES, {"model": "m", "input": "hi", "store": True,
                                                "metadata": {"a": "b"}, "max_output_tokens": 5})
    assert not isinstance(responses, Result) and responses.metadata == {"a": "b"}
    refused = engine._parse("r", RESPONSES, {"model": "m", "input": "hi", "background": True})
    assert isinstance(refused, Result) and refused.body["error"]["param"] == "background"
    for body in ({"queries": "q", "documents": ["a", "b"]}, {"text_1": "q", "text_2": "a"},
                 {"data_1": ["q"], "data_2": ["a"]}):
        parsed = engine._parse("r", SCORE, {"model": "m", **body})
        assert not isinstance(parsed, Result), (body, parsed.body)
    rerank = engine._parse("r", RERANK, {"model": "m", "query": "q", "documents": ["a"], "top_n": 1})
    assert not isinstance(rerank, Result) and rerank.top_n == 1
    unknown = engine._parse("r", RERANK, {"model": "m", "query": "q", "documents": ["a"], "frob": 1})
    assert isinstance(unknown, Result) and unknown.body["error"]["param"] == "frob"
    streamed = engine._parse("r", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                         "stream": True, "stream_options": {"include_usage": True}},
                             streaming=True)
    assert not isinstance(streamed, Result) and streamed.stream is True


def test_stopping_gives_what_a_load_froze_back_to_the_garbage_collector(engine: VLLMEngine) -> None:
    """A load freezes everything alive out of garbage collection (see the model-switch test in test_e2e.py for
    the real load); stopping must unfreeze it, or an unloaded model's reference cycles would never be freed."""
    import asyncio
    import gc

    gc.freeze()  # as `_freeze_what_is_loaded` leaves the process after a load
    try:
        assert gc.get_freeze_count() > 0
        asyncio.run(engine.stop())
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


# ---- several resident models (--max-loaded-models) and vLLM's sleep mode (--max-sleeping-models) --------------


def test_resident_models_split_the_cpu_kv_cache_space_and_sleep_mode_reaches_the_engine_arguments(
        model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.engines.vllm import VLLMEngine, is_cpu_platform

    if not is_cpu_platform():
        pytest.skip("the CPU split; a GPU splits gpu_memory_utilization (tests/server/test_residency_fit.py)")
    smollm2 = model_files.resolve(model_files.SMOLLM2, model_cache)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # the user's total: each of two engines gets half
    engine = VLLMEngine(Settings(model_cache_dir=model_cache, max_model_len=1024, max_loaded_models=2,
                                 max_sleeping_models=1))
    kwargs = engine._engine_kwargs(smollm2)
    assert kwargs["kv_cache_memory_bytes"] == 2 * 2**30 and kwargs["enable_sleep_mode"] is True
    # vLLM's CPU build has no sleep mode: it refuses the argument, naming it (the server refuses the flag at
    # start, see test_sleeping_models_are_refused_at_start_on_cpu).
    with pytest.raises(Exception, match="Sleep mode is not supported on current platform"):
        engine._engine_config(engine._build_args(smollm2)[0])
    # vLLM's CPU platform would replace the share with the variable's whole 4 GiB: the config keeps the share.
    two = VLLMEngine(Settings(model_cache_dir=model_cache, max_model_len=1024, max_loaded_models=2))
    engine_args, _ = two._build_args(smollm2)
    assert two._engine_config(engine_args).cache_config.kv_cache_memory_bytes == 2 * 2**30

    # One model, as before: nothing split, nothing asked of sleep mode.
    alone = VLLMEngine(Settings(model_cache_dir=model_cache, max_model_len=1024))._engine_kwargs(smollm2)
    assert "kv_cache_memory_bytes" not in alone and "enable_sleep_mode" not in alone
    # A share set per engine by hand is kept.
    given = VLLMEngine(Settings(model_cache_dir=model_cache, max_loaded_models=2,
                                engine_args={"kv_cache_memory_bytes": 3 * 2**30}))._engine_kwargs(smollm2)
    assert given["kv_cache_memory_bytes"] == 3 * 2**30

    # The spawned engine core gets no VLLM_CPU_KVCACHE_SPACE of ours with several models (it would override
    # each engine's share); with one, the 2 GiB default as before.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    engine._prepare_environment(smollm2)
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine._set_env
    one = VLLMEngine(Settings(model_cache_dir=model_cache))
    one._prepare_environment(smollm2)
    assert "VLLM_CPU_KVCACHE_SPACE" in one._set_env
    for name in one._set_env + engine._set_env:
        monkeypatch.delenv(name, raising=False)


def test_sleep_and_wake_ask_vllm_for_level_1_and_wake_up(engine: VLLMEngine) -> None:
    """What the engine owner's sleep and wake become (a GPU-only vLLM feature: a stand-in AsyncLLM records the
    calls; the owner's order of operations is tested on echo engines in tests/server/test_resident.py)."""
    import asyncio

    calls: list[str] = []

    class SleepyLLM:
        async def sleep(self, level: int = 1) -> None:
            calls.append(f"sleep level={level}")

        async def wake_up(self, tags: list[str] | None = None) -> bool:
            calls.append(f"wake_up tags={tags}")
            return True

    engine._llm = SleepyLLM()  # type: ignore[assignment]
    asyncio.run(engine.sleep())
    asyncio.run(engine.wake_up())
    assert calls == ["sleep level=1", "wake_up tags=None"]

    class Refusing(SleepyLLM):
        async def sleep(self, level: int = 1) -> None:
            raise ValueError("Sleep mode is not enabled")

    engine._llm = Refusing()  # type: ignore[assignment]
    with pytest.raises(EngineError, match=r"could not put .* to sleep"):
        asyncio.run(engine.sleep())
    engine._llm = None


def _serve(tmp_path: Path, model_cache: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vllm_batch_server.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--port", "0", "--model-cache-dir", str(model_cache), *flags], env=env, capture_output=True, text=True,
        timeout=300)


def test_resident_models_that_cannot_fit_are_refused_at_start(model_cache: Path, tmp_path: Path) -> None:
    """Three engines of 1 GiB / 3 of KV cache each cannot hold one 8,192-token sequence of SmolLM2 (360 MiB):
    the server says so and exits before it starts anything."""
    done = _serve(tmp_path, model_cache, "--max-loaded-models", "3", "--max-model-len", "8192")
    assert done.returncode == 2, done.stderr
    assert "--max-loaded-models 3: model 'smollm2-135m-instruct' needs 0.35 GiB of KV cache" in done.stderr
    assert "each engine gets 0.33 GiB (VLLM_CPU_KVCACHE_SPACE 1 GiB / 3)" in done.stderr
    assert not (tmp_path / "data" / "vllm-batch.sqlite3").exists()


def test_sleeping_models_are_refused_at_start_on_cpu(model_cache: Path, tmp_path: Path) -> None:
    from vllm_batch_server.engines.vllm import is_cpu_platform

    if not is_cpu_platform():
        pytest.skip("a GPU has vLLM's sleep mode")
    done = _serve(tmp_path, model_cache, "--max-sleeping-models", "1")
    assert done.returncode == 2, done.stderr
    assert "--max-sleeping-models needs vLLM's sleep mode, which vLLM does not have on this platform (CPU)" in (
        done.stderr)


def test_each_endpoint_s_request_validator_is_built_once_not_per_request(engine: VLLMEngine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A pydantic TypeAdapter builds its whole validator when it is constructed (1.4 ms for vLLM's embedding
    request union, 20 µs to validate with it once built): one per request was half of the server's own CPU on
    an embeddings batch. Bodies still validate, and bad ones are still refused by name, with the one built."""
    import pydantic

    from vllm_batch_server.engines.base import RERANK, SCORE

    built: list[object] = []

    class Counting(pydantic.TypeAdapter):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pydantic, "TypeAdapter", Counting)
    bodies = {EMBEDDINGS: {"model": "m", "input": "hi"}, SCORE: {"model": "m", "text_1": "q", "text_2": "a"},
              CHAT: {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
              RERANK: {"model": "m", "query": "q", "documents": ["a"]}}
    after_first: int | None = None
    for i in range(20):
        for url, body in bodies.items():
            parsed = engine._parse(f"r{i}", url, dict(body))
            assert not isinstance(parsed, Result), (url, parsed.body)
        # The first round may import vLLM's request modules, which build adapters of their own.
        after_first = len(built) if after_first is None else after_first
    assert len(built) == after_first
    refused = engine._parse("r", EMBEDDINGS, {"model": "m", "input": 3.5})
    assert isinstance(refused, Result) and refused.status_code == 400 and "input" in refused.body["error"]["param"]
    assert len(built) == after_first


def test_vllm_is_imported_once_in_the_background_when_the_engine_is_built(engine: VLLMEngine) -> None:
    """Building the engine starts importing vLLM in a thread, once per process, so the first model load does not
    spend its first seconds importing it (docs/engines.md)."""
    import sys

    from vllm_batch_server.engines import vllm as vllm_module

    thread = vllm_module.import_vllm_in_background()
    assert thread is not None and thread is vllm_module.import_vllm_in_background()
    assert not thread.daemon  # a server stopped meanwhile waits for the import rather than exiting inside it
    thread.join(300)
    assert not thread.is_alive()
    assert {"vllm.engine.arg_utils", "vllm.v1.engine.async_llm"} <= set(sys.modules)
