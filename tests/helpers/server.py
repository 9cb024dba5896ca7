"""Start the real server the way a user does (`vllm-batch-server serve ...`) as a subprocess on loopback."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_state(process: subprocess.Popen[bytes] | None) -> str:
    """For a failed test's report: whether a process it started still runs, or how it ended."""
    if process is None:
        return "not running (stopped or never started by the test)"
    code = process.poll()
    return f"running, pid {process.pid}" if code is None else f"exited with {code}"


@dataclass
class RunningServer:
    data_dir: Path
    port: int
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    api_key: str | None = None
    starts: int = field(default=0)
    nofile: int | None = None  # the server's descriptor limit (RLIMIT_NOFILE, soft and hard), if set
    module: str = "vllm_batch_server.cli"  # what `python -m` runs: the CLI, or a test's wrapper of it
    _http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """A plain httpx client on this server (base_url is the root), as InProcessServer.http is on the app."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.root_url, timeout=30)
        return self._http

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> RunningServer:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        log.write(f"\n===== start #{self.starts} =====\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=self._limit_descriptors if self.nofile else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.root_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not become healthy within {timeout}s:\n{self.log()}")

    def _limit_descriptors(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def describe(self) -> str:
        return f"{process_state(self.process)}\n{self.log()}"

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """A new httpx client on this server, for a test's own `with ... as http:`."""
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("base_url", self.root_url)
        return httpx.Client(**kwargs)

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def kill(self) -> None:
        """kill -9 the whole process group: the server and any engine process it spawned."""
        self._close_http()
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """A graceful stop (SIGTERM), falling back to kill -9."""
        self._close_http()
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


def make_server(data_dir: Path, *, engine: str = "echo", models: list[str] | None = None,
                extra_args: list[str] | None = None, api_key: str | None = None,
                env: dict[str, str] | None = None, port: int | None = None,
                nofile: int | None = None, module: str = "vllm_batch_server.cli") -> RunningServer:
    """Build (not start) a server on a free loopback port with its data in `data_dir`."""
    port = port or free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), "--engine", engine]
    for model in models or (["echo-model", "echo-embed"] if engine == "echo" else []):
        args += ["--model", model]
    if api_key:
        args += ["--api-key", api_key]
    args += extra_args or []
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
    full_env.update(env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    return RunningServer(data_dir=data_dir, port=port, args=args, env=full_env,
                         log_path=data_dir.parent / f"{data_dir.name}-server.log", api_key=api_key,
                         nofile=nofile, module=module)
