"""Echo backends (tests/helpers/echo_backend.py) as separate processes on loopback, for the router's tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.server import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class EchoBackend:
    directory: Path
    name: str
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def journal(self) -> Path:
        return self.directory / f"{self.name}.journal.jsonl"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> EchoBackend:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.echo_backend", "--port", str(self.port),
                 "--journal", str(self.journal), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"echo backend {self.name} exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=1.0).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"echo backend {self.name} did not answer within {timeout}s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def events(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line]

    def done_ids(self) -> Counter[str]:
        return Counter(event["id"] for event in self.events() if event["event"] == "done")

    def started_ids(self) -> set[str]:
        return {event["id"] for event in self.events() if event["event"] == "start"}
