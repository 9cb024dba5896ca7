"""What every benchmark shares: a real server in a subprocess, an RSS sampler, the HTTP calls of a batch's
life (upload, create, wait, download), tables on stdout and JSON under `benchmarks/results/`.

Benchmarks talk to the server over loopback HTTP exactly as a user's client does; nothing here imports the
server's internals, so what is measured is what a user gets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024


# ---- machine and output ----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": commit,
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/NAME-<UTC time>.json, and NAME-latest.json beside it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    document = {"benchmark": name, "finished_at": stamp, "machine": machine_info(), **payload}
    text = json.dumps(document, indent=2, default=str)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / f"{name}-latest.json").write_text(text)
    return path


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True)))

    print(line(list(columns)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    sys.stdout.flush()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def workdir(keep: bool = False, prefix: str = "vllm-batch-bench-") -> Iterator[Path]:
    """A scratch directory on the same disk as the data (not tmpfs), removed afterwards unless kept."""
    base = os.environ.get("BENCH_TMPDIR") or None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (data, logs)")
    parser.add_argument("--no-json", action="store_true", help="print tables only")
    return parser


# ---- the server ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """`vllm-batch-server serve` in its own process group on a free loopback port."""

    data_dir: Path
    engine: str = "echo"
    models: list[str] = field(default_factory=lambda: ["echo-model", "echo-embed"])
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    module: str = "vllm_batch_server.cli"  # what `python -m` runs: the CLI, or a benchmark's wrapper of it

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> Server:
        """Start the process without waiting for it to be ready."""
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--engine", self.engine]
        for model in self.models:
            args += ["--model", model]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
        env.update(self.env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "serve", *args, *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
        return self

    def wait_healthy(self, timeout: float = 120.0) -> float:
        """Seconds from launch until /health answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"server exited early; log tail:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return time.monotonic() - self.started_at
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"server not healthy after {timeout}s; log tail:\n{self.log_tail()}")

    def start(self, timeout: float = 120.0) -> Server:
        self.launch()
        self.wait_healthy(timeout)
        return self

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9 the process group (the server and any engine process it spawned)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.process = None

    def stop(self) -> None:
        """SIGTERM, then kill -9 if it lingers."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- CPU and memory ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int, *, descendants: bool = False) -> float:
    """CPU seconds (user + system) used so far by process `pid`, or with `descendants` by its live descendants
    instead (vLLM's engine core and workers are child processes). 0 for a process that is gone."""
    try:
        root = psutil.Process(pid)
        processes = root.children(recursive=True) if descendants else [root]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total



def tree_rss(pid: int) -> int:
    """RSS of a process and its descendants (vLLM's engine core is a child process)."""
    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total
    except psutil.Error:
        return 0


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread; `mark()` records named phases."""

    def __init__(self, pid: int, interval: float = 0.05, children: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.children = children
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[str, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _read(self) -> int:
        if self.children:
            return tree_rss(self.pid)
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self._read()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, name: str) -> int:
        rss = self._read()
        self.marks.append((name, time.monotonic() - self._t0, rss))
        return rss

    def peak_between(self, start: float, end: float) -> int:
        values = [rss for t, rss in self.samples if start <= t <= end]
        return max(values, default=0)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# ---- a batch's life over HTTP ----------------------------------------------------------------------------


class BatchAPI:
    """The few Files/Batches calls a benchmark needs, over one keep-alive connection."""

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def upload(self, path: Path, purpose: str = "batch") -> str:
        with open(path, "rb") as fh:  # httpx streams a file object in chunks: the 1 GB never sits in memory
            response = self.client.post("/v1/files", data={"purpose": purpose},
                                        files={"file": (path.name, fh, "application/jsonl")})
        response.raise_for_status()
        return str(response.json()["id"])

    def create_batch(self, file_id: str, endpoint: str) -> dict[str, Any]:
        response = self.client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                         "completion_window": "24h"})
        response.raise_for_status()
        return dict(response.json())

    def batch(self, batch_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/batches/{batch_id}")
        response.raise_for_status()
        return dict(response.json())

    def wait(self, batch_id: str, poll: float = 0.02, timeout: float = 7200.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.batch(batch_id)
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                return batch
            time.sleep(poll)
        raise TimeoutError(f"batch {batch_id} still running after {timeout}s")

    @contextlib.contextmanager
    def watch(self) -> Iterator[EventWatch]:
        """The server's event stream (GET /v1/events/stream), opened now: events from this moment on."""
        with self.client.stream("GET", "/v1/events/stream") as response:
            response.raise_for_status()
            yield EventWatch(response.iter_lines())

    def download(self, file_id: str, dest: Path) -> int:
        size = 0
        with self.client.stream("GET", f"/v1/files/{file_id}/content") as response, open(dest, "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes(1024 * 1024):
                out.write(chunk)
                size += len(chunk)
        return size

    def delete(self, file_id: str) -> None:
        self.client.delete(f"/v1/files/{file_id}")


ENDED_EVENTS = frozenset(f"batch.{status}" for status in ("completed", "failed", "expired", "cancelled"))


class EventWatch:
    """Learns the moment a batch ends from the server's event stream instead of asking for its status: polling
    is late by up to its interval, and each status call costs the server 1-2 ms of CPU that a 2-core machine
    takes from the engine (a poll every 0.25 s was half of the server's own CPU in a chat batch)."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines

    def until_ended(self, batch_id: str) -> None:
        event: str | None = None
        data: dict[str, Any] | None = None
        for line in self._lines:
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data = json.loads(line[len("data:"):])
            elif not line:  # the end of one message
                if event in ENDED_EVENTS and data is not None and data.get("data", {}).get("id") == batch_id:
                    return
                event, data = None, None
        raise RuntimeError(f"the event stream ended before batch {batch_id} did")


@dataclass
class RoundTrip:
    """One batch from upload to downloaded output, timed per phase."""

    upload_s: float
    run_s: float  # batch created → completed (validation, queueing, running, finalizing)
    download_s: float
    batch: dict[str, Any]
    output_bytes: int

    @property
    def wall_s(self) -> float:
        return self.upload_s + self.run_s + self.download_s


def round_trip(api: BatchAPI, path: Path, endpoint: str, output: Path, poll: float = 0.02,
               events: bool = False) -> RoundTrip:
    """Upload, create, wait, download. With `events`, the wait follows the server's event stream (opened before
    the upload, so the batch's end cannot be missed) and asks for the batch once it ended; else it polls."""
    with api.watch() if events else contextlib.nullcontext() as watch:
        t0 = time.perf_counter()
        file_id = api.upload(path)
        t1 = time.perf_counter()
        created = api.create_batch(file_id, endpoint)
        if watch is not None:
            watch.until_ended(created["id"])
            batch = api.batch(created["id"])
        else:
            batch = api.wait(created["id"], poll=poll)
        t2 = time.perf_counter()
    if batch["status"] != "completed":
        raise RuntimeError(f"batch ended {batch['status']}: {batch.get('errors')}")
    size = 0
    if batch.get("output_file_id"):
        size = api.download(batch["output_file_id"], output)
    if batch.get("error_file_id"):
        size += api.download(batch["error_file_id"], output.with_suffix(".errors.jsonl"))
    t3 = time.perf_counter()
    return RoundTrip(t1 - t0, t2 - t1, t3 - t2, batch, size)


def write_jsonl(path: Path, lines: Iterator[dict[str, Any]] | Sequence[dict[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            count += 1
    return count
