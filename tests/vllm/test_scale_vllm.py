"""Real vLLM (CPU build) past the in-process engine: vLLM's own OpenAI server as a backend gives the in-process
engine's greedy answers, and the in-process engine with data parallelism (two engine cores) does too.

Both opt-in (BATCH_SLOW_TESTS=1): each starts a second real engine, minutes on this machine, beyond CI's budget.
Their results are recorded in docs/scale.md."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ServerFactory, read_jsonl, sdk, submit, wait_for
from tests.helpers.backends import running, vllm_serve
from tests.helpers.server import RunningServer
from tests.vllm.conftest import BATCH_TIMEOUT, CHAT_MODEL, MAX_MODEL_LEN, QUESTIONS, chat_line

pytestmark = pytest.mark.vllm

LINES = [chat_line(f"q{i}", question) for i, question in enumerate(QUESTIONS[:8])]


def answers(client: openai.OpenAI, lines: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """custom_id -> (greedy answer, prompt tokens), from a batch of `lines`."""
    batch = wait_for(client, submit(client, lines).id, timeout=BATCH_TIMEOUT)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(lines), batch.request_counts
    return {line["custom_id"]: (line["response"]["body"]["choices"][0]["message"]["content"],
                                line["response"]["body"]["usage"]["prompt_tokens"])
            for line in read_jsonl(client, batch.output_file_id)}


@pytest.fixture(scope="module")
def vllm_openai_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` for SmolLM2 on a free loopback port."""
    from vllm_batch_server.engines import model_files

    folder = model_files.resolve(CHAT_MODEL, model_cache).path
    backend = vllm_serve(tmp_path_factory.mktemp("vllm-openai"), "vllm-openai", folder, CHAT_MODEL,
                         max_model_len=MAX_MODEL_LEN)
    with running([backend], timeout=BATCH_TIMEOUT):
        yield backend.url


@pytest.mark.skipif(not os.environ.get("BATCH_SLOW_TESTS"),
                    reason="set BATCH_SLOW_TESTS=1 to start vLLM's own OpenAI server beside the engine (2-3 minutes)")
def test_vllm_openai_server_as_backend_gives_the_in_process_answers(
        vllm_server: RunningServer, vllm_openai_server: str, server_factory: ServerFactory) -> None:
    in_process = answers(sdk(vllm_server, timeout=60), LINES)
    routed = server_factory("routed", engine="http", extra_args=["--backend", vllm_openai_server])
    client = sdk(routed, timeout=60)
    assert [m.id for m in client.models.list()] == [CHAT_MODEL]  # discovered from its /v1/models
    over_http = answers(client, LINES)
    assert over_http == in_process
    assert all(text for text, _ in over_http.values())


@pytest.mark.skipif(not os.environ.get("BATCH_SLOW_TESTS"),
                    reason="set BATCH_SLOW_TESTS=1 to start a second engine with two engine cores (2-4 minutes)")
def test_data_parallel_two_engines_in_process(vllm_server: RunningServer, tmp_path: Path) -> None:
    from tests.vllm.conftest import start_vllm_server

    single = answers(sdk(vllm_server, timeout=60), LINES)
    server = start_vllm_server(tmp_path / "dp2", "--data-parallel-size", "2")
    try:
        client = sdk(server, timeout=60)
        assert answers(client, LINES) == single
        assert "capacity=512" in server.log()  # 2 x max_num_seqs (128) x 2 engines in flight
    finally:
        server.stop()
