"""Every example in examples/ runs against a real local server (echo engine), as a user would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import RunningServer, free_port, make_server

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
COMPARE = ["echo-model", "echo-b", "echo-c"]


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = make_server(tmp_path_factory.mktemp("examples") / "data", models=[*COMPARE, "echo-embed"]).start()
    yield running
    running.kill()


def run_example(path: Path, server: RunningServer | None, cwd: Path,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_", "OPENAI_", "PARASAIL_"))}
    env.update(PYTHONPATH=str(REPO), MODEL="echo-model", EMBED_MODEL="echo-embed", COMPARE_MODELS=",".join(COMPARE))
    if server is not None:
        env["BATCH_BASE_URL"] = server.base_url
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180, check=False)


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES} == set(EXPECTED)


EXPECTED = {
    "quickstart.py": ["36 requests ready", "question-0: 'What is the capital of France?' -> 'What is the capital",
                      "... and 28 more in", "resumed: completed", "3 embeddings of dimension 384"],
    "async_app.py": ["[job]", "completed 3/3", "stayed responsive", "... -> Quarterly revenue grew by twelve percent"],
    "switch_provider.py": ["provider: local", "Loved it, would buy again."],
    "embeddings.py": ["5 embeddings of dimension 384", "closest to 'baking at home':"],
    "online.py": ["submitted: 200 requests", "online: What is the capital of France?",
                  "streamed: Say hello to the team.", "batch: completed, 200 of 200 done"],
    "webhook_receiver.py": ["verified batch.completed for batch_", "the webhook arrived, verified: done"],
    "compare_models.py": ["(3 batches for 3 models)", "== math: What is 17 times 3?",
                          "echo-c: What is 17 times 3?"],
    "curation.py": ["q3: 'Who wrote Hamlet?'", "followed 6 results", "nothing to retry (no_failed_requests)",
                    "marked 6 gold", "wrote 6 training examples to gold.jsonl; roles: ['system', 'user', 'assistant']",
                    "wrote 0 tasks to review.json"],
}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, example_server: RunningServer, tmp_path: Path) -> None:
    done = run_example(path, example_server, tmp_path)
    assert done.returncode == 0, f"{path.name} failed:\n{done.stdout}\n{done.stderr}"
    for expected in EXPECTED[path.name]:
        assert expected in done.stdout, f"{expected!r} not in the output of {path.name}:\n{done.stdout}"


def test_quickstart_starts_a_server_when_none_runs(tmp_path: Path) -> None:
    """`python3 dev.py demo` runs the quickstart with no server around: it starts one and stops it at the end."""
    port = str(free_port())
    done = run_example(REPO / "examples" / "quickstart.py", None, tmp_path, {
        "BATCH_SERVER_PORT": port, "BATCH_SERVER_ENGINE": "echo", "BATCH_SERVER_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert f"starting vllm-batch-server on http://localhost:{port}" in done.stdout
    assert "3 embeddings of dimension 384" in done.stdout
    with pytest.raises(OSError):  # stopped again
        socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
