"""kill -9 of the server and its vLLM engine mid-batch; a restart finishes the batch, each request once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import sdk, submit, wait_for
from tests.faults.checks import assert_exactly_once
from tests.vllm.conftest import BATCH_TIMEOUT, chat_line, start_vllm_server

pytestmark = pytest.mark.vllm

N = 32  # four waves of the window of 8: the kill lands after the first, with the rest to run


def test_kill_9_mid_batch_then_restart_yields_every_request_exactly_once(model_cache: Path,
                                                                        tmp_path: Path) -> None:
    # A small window and frequent checkpoints: the kill lands with some results committed and others in
    # flight inside vLLM, which is the case that must neither lose nor duplicate a line.
    server = start_vllm_server(tmp_path / "data", "--window", "8", "--checkpoint-every", "4")
    try:
        client = sdk(server, timeout=60)
        lines = [chat_line(f"req-{i}", f"Write one sentence about the number {i}.", max_tokens=24)
                 for i in range(N)]
        batch = submit(client, lines)
        running = wait_for(client, batch.id, timeout=BATCH_TIMEOUT,
                           until=lambda b: b.request_counts is not None and b.request_counts.completed >= 8)
        assert running.status == "in_progress", running
        assert running.request_counts.completed < N, "the batch finished before the kill; make it longer"
        server.kill()  # SIGKILL to the whole process group: the server and vLLM's engine processes

        server.start(timeout=120)
        client = sdk(server, timeout=60)
        done = wait_for(client, batch.id, timeout=BATCH_TIMEOUT)
        assert done.status == "completed", done
        result_lines = assert_exactly_once(client, done, {f"req-{i}" for i in range(N)})
        assert all(line["response"]["status_code"] == 200 for line in result_lines)
        assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in result_lines)
        # The engine was loaded once before the kill and once after it.
        assert server.log_path.read_text(errors="replace").count("vLLM loaded smollm2-135m-instruct") == 2
    finally:
        server.kill()
