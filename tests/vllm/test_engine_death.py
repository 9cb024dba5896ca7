"""vLLM's engine-core process dies under a running server: the engine reports EngineError, its owner restarts
it, and the batch completes. Runs on the session server after the end-to-end tests, on whichever model they
left loaded (a kill needs no switch)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import submit, wait_for
from tests.faults.checks import assert_exactly_once
from tests.vllm.conftest import BATCH_TIMEOUT, CHAT_MODEL, EMBED_MODEL, BackToBack, chat_line, embed_line

pytestmark = pytest.mark.vllm


def _engine_core(server_pid: int) -> psutil.Process:
    """The process vLLM spawned for its engine core (a direct child of the server)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(server_pid).children():
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "EngineCore" in title or "multiprocessing.spawn" in title:
                return child
        time.sleep(0.5)
    raise AssertionError("no engine-core process under the server")


def test_engine_core_killed_is_restarted_and_the_batch_completes(back_to_back: BackToBack) -> None:
    b = back_to_back
    assert b.server.process is not None
    # The engine core of whichever model the tests before left loaded: killing it needs no switch.
    model = httpx.get(b.server.root_url + "/health", timeout=60).json()["loaded_model"]
    assert model in (CHAT_MODEL, EMBED_MODEL), model
    loads = b.server.log_path.read_text(errors="replace").count(f"vLLM loaded {model}")
    core = _engine_core(b.server.process.pid)
    os.kill(core.pid, signal.SIGKILL)
    core.wait(timeout=30)

    if model == EMBED_MODEL:
        lines = [embed_line(f"after-{i}", f"sentence {i} after the engine died") for i in range(20)]
        endpoint = "/v1/embeddings"
    else:
        lines = [chat_line(f"after-{i}", f"Say {i}.", max_tokens=4) for i in range(20)]
        endpoint = "/v1/chat/completions"
    batch = wait_for(b.client, submit(b.client, lines, endpoint=endpoint).id, timeout=BATCH_TIMEOUT)
    assert batch.status == "completed", batch
    result = assert_exactly_once(b.client, batch, {f"after-{i}" for i in range(20)})
    assert all(line["response"]["status_code"] == 200 for line in result)
    log = b.server.log_path.read_text(errors="replace")
    assert "engine failed on batch" in log and "the vLLM engine died" in log
    assert log.count(f"vLLM loaded {model}") == loads + 1  # restarted once, with the same model
