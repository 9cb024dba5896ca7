"""`vllm-batch` writing into a pipe whose reader stops early (`| head`): it stops quietly, as a shell tool does,
with no "Broken pipe" message. A real pipe into a real `head`, against a real server (echo engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client_integration.conftest import ask
from tests.helpers.server import RunningServer
from vllm_batch import VLLMBatch

# More result lines than a pipe's buffer (64 KiB) holds, so the writer is still writing when head has gone.
REQUESTS = 600


@pytest.fixture(scope="module")
def batch_id(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path_factory.mktemp("pipes")) as batch:
        for i in range(REQUESTS):
            batch.add_to_batch(**ask(f"question number {i} " + "padding " * 30))
        batch.submit()
        assert batch.wait(poll_interval=0.2, progress=False, timeout=120).status == "completed"
        return batch.id


@pytest.mark.parametrize(("command", "reader"), [
    (["results"], ["head", "-c", "10"]),
    (["results"], ["head", "-n", "1"]),
    (["tail", "--poll-interval", "0.2"], ["head", "-n", "2"]),
])
def test_a_closed_pipe_stops_the_command_quietly(server: RunningServer, batch_id: str, tmp_path: Path,
                                                  command: list[str], reader: list[str]) -> None:
    if shutil.which(reader[0]) is None:
        pytest.skip(f"no {reader[0]}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writer = subprocess.Popen([sys.executable, "-m", "vllm_batch._cli", command[0], batch_id, *command[1:],
                               "--base-url", server.base_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=tmp_path, env=env)
    assert writer.stdout is not None and writer.stderr is not None
    head = subprocess.Popen(reader, stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # head alone holds the reading end now, as in a shell pipeline
    shown, _ = head.communicate(timeout=120)
    err = writer.stderr.read().decode()
    code = writer.wait(timeout=120)
    assert shown, "head got the first bytes"
    assert "Broken pipe" not in err and "Errno 32" not in err and "Traceback" not in err, err
    assert code in (0, 141), (code, err)
