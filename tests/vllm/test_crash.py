"""kill -9 of the server and its vLLM engines mid-batch; a restart finishes the batches, each request once.

The server keeps both embedded models loaded side by side (`--max-loaded-models 2`, `--preload`), so the kill
lands while a chat batch and an embeddings batch run at the same time, each on its engine: one queue, two
resident models, answered exactly once across the kill."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import sdk, submit, wait_for
from tests.faults.checks import assert_exactly_once
from tests.helpers.server import RunningServer
from tests.vllm.conftest import BATCH_TIMEOUT, CHAT_MODEL, EMBED_MODEL, chat_line, embed_line, start_vllm_server
from vllm_batch_server.engines import cpu_cores

pytestmark = pytest.mark.vllm

N = 40  # five waves of the window of 8, each 64 tokens long: the kill lands after the first, with four to run
EMBEDDINGS = 240  # ~200 tokens each: thirty waves of 8, far from done when the kill lands after the first
TEXT = "Batch inference keeps results durable across crashes. "


def test_kill_9_mid_batch_then_restart_yields_every_request_exactly_once(model_cache: Path,
                                                                        tmp_path: Path) -> None:
    # A small window and frequent checkpoints: the kill lands with some results committed and others in
    # flight inside vLLM, which is the case that must neither lose nor duplicate a line.
    shares = cpu_cores.split(cpu_cores.read_topology(), 2)  # None on fewer than two physical cores
    server = start_vllm_server(tmp_path / "data", "--window", "8", "--checkpoint-every", "4",
                               "--max-loaded-models", "2", "--preload", timeout=BATCH_TIMEOUT)
    try:
        client = sdk(server, timeout=60)
        # ignore_eos: every chat runs its 64 tokens, so the chats' waves have a known length on any machine.
        lines = [chat_line(f"req-{i}", f"Write one sentence about the number {i}.", max_tokens=64,
                           ignore_eos=True) for i in range(N)]
        embeddings = [embed_line(f"emb-{i}", f"{i}: " + TEXT * 20) for i in range(EMBEDDINGS)]
        # The embeddings start once the chats have done a wave, so they need not outlast the chats' first wave
        # (1,500 of them did, which made this the suite's costliest test); the four waves the chats still have
        # to run outlast the embeddings' first.
        batch = submit(client, lines)
        wait_for(client, batch.id, timeout=BATCH_TIMEOUT,
                 until=lambda b: b.request_counts is not None and b.request_counts.completed >= 8)
        embed = submit(client, embeddings, endpoint="/v1/embeddings")
        embedding = wait_for(client, embed.id, timeout=BATCH_TIMEOUT,
                             until=lambda b: b.request_counts is not None and b.request_counts.completed >= 8)
        running = client.batches.retrieve(batch.id)
        assert running.status == embedding.status == "in_progress", (running, embedding)
        if shares is not None:
            # Each resident model computes on cores of its own (engines/cpu_cores.py), not both on vLLM's pick.
            pinned = workers_cores(server)
            assert len(pinned) == 2 and not set.intersection(*pinned), pinned
        assert running.request_counts.completed < N, "the chats finished before the kill; make them longer"
        assert embedding.request_counts.completed < EMBEDDINGS, "the embeddings finished before the kill"
        server.kill()  # SIGKILL to the whole process group: the server and both vLLM engine-core processes

        server.start(timeout=BATCH_TIMEOUT)  # both models load before it listens (--preload)
        client = sdk(server, timeout=60)
        done = wait_for(client, batch.id, timeout=BATCH_TIMEOUT)
        assert done.status == "completed", done
        result_lines = assert_exactly_once(client, done, {f"req-{i}" for i in range(N)})
        assert all(line["response"]["status_code"] == 200 for line in result_lines)
        assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in result_lines)
        embedded = wait_for(client, embed.id, timeout=BATCH_TIMEOUT)
        assert embedded.status == "completed", embedded
        embed_results = assert_exactly_once(client, embedded, {f"emb-{i}" for i in range(EMBEDDINGS)})
        assert all(len(line["response"]["body"]["data"][0]["embedding"]) == 384 for line in embed_results)
        # Both engines' own metrics are scraped, though vLLM took the first one's out of the registry.
        scraped = text_string_to_metric_families(httpx.get(server.root_url + "/metrics", timeout=30).text)
        vllm_models = {sample.labels.get("model_name") for family in scraped if family.name.startswith("vllm:")
                       for sample in family.samples}
        assert {CHAT_MODEL, EMBED_MODEL} <= vllm_models, vllm_models
        loaded = httpx.get(server.root_url + "/status", timeout=30).json()["engine"]["loaded_models"]
        assert sorted((entry["model"], entry["state"]) for entry in loaded) == [(EMBED_MODEL, "ready"),
                                                                                  (CHAT_MODEL, "ready")]
        if shares is not None:
            # /status names each model's cores: after the restart too, a share each.
            assert sorted(entry["cpu_cores"] for entry in loaded) == sorted(shares), loaded
        # Each model was loaded once before the kill and once after it, side by side: never unloaded.
        log = server.log_path.read_text(errors="replace")
        assert log.count(f"vLLM loaded {CHAT_MODEL}") == 2 and log.count(f"vLLM loaded {EMBED_MODEL}") == 2
        assert "unloading model" not in log
    finally:
        server.kill()


def workers_cores(server: RunningServer) -> list[set[int]]:
    """The CPUs each vLLM worker process under the server runs its threads on (the union of its threads')."""
    assert server.process is not None
    found = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "VLLM::Worker" not in " ".join(child.cmdline()):
                continue
            cpus: set[int] = set()
            for thread in child.threads():
                cpus |= os.sched_getaffinity(thread.id)
            found.append(cpus)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found
