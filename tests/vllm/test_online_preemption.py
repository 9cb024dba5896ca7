"""Batch requests that vLLM preempts for online ones are recomputed, not lost and not counted twice.

On a server with a KV cache far too small for its batch (`small_cache_server`: 8 usable blocks of 128 tokens, for
8 sequences that each grow to 2 blocks): vLLM's priority scheduler must preempt running batch requests to make
room, for each other and for the online requests sent meanwhile. vLLM's own counter (in GET /metrics) shows it
did."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import sdk, submit, wait_for
from tests.faults.checks import assert_exactly_once
from tests.helpers.server import RunningServer
from tests.vllm.conftest import BATCH_TIMEOUT, CHAT_MODEL, chat_line

pytestmark = pytest.mark.vllm

# With a prompt of ~40 tokens (the chat template's system line and a short question): a sequence outgrows its
# first KV block of 128 tokens, so each needs two. (200 tokens showed the same; 120 takes 40 % less time.)
TOKENS = 120


def _preemptions(server_url: str) -> float:
    text = httpx.get(server_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def test_preempted_batch_requests_are_recomputed_exactly_once(small_cache_server: RunningServer) -> None:
    server = small_cache_server
    client = sdk(server, timeout=300)
    lines = [chat_line(f"long-{i}", f"Write about the number {i}.", max_tokens=TOKENS, ignore_eos=True)
             for i in range(16)]
    batch = submit(client, lines)  # loads the model first (in_progress already while it loads)
    deadline = time.monotonic() + BATCH_TIMEOUT
    # httpx's default 5 s is too short on a 2-core machine that is also running other tests: the model's
    # load (imports in a thread, holding the GIL) slows every answer while it lasts.
    while httpx.get(server.root_url + "/health", timeout=60).json()["loaded_model"] != CHAT_MODEL:
        assert time.monotonic() < deadline, "the model never loaded"
        time.sleep(1)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    answers: list[str | None] = []

    def online() -> None:
        for i in range(3):
            answer = client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=100,
                temperature=0, extra_body={"ignore_eos": True})
            answers.append(answer.choices[0].message.content)

    worker = threading.Thread(target=online)
    worker.start()
    done = wait_for(client, batch.id, timeout=BATCH_TIMEOUT)
    worker.join(timeout=BATCH_TIMEOUT)
    assert done.status == "completed", done
    results = assert_exactly_once(client, done, {f"long-{i}" for i in range(16)})
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == TOKENS for r in results)
    assert len(answers) == 3 and all(answers)
    assert _preemptions(server.root_url) > 0  # the point: vLLM did preempt, and nothing was lost
