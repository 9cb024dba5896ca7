"""A real Prometheus server (Debian's `prometheus` package) on loopback, scraping a test server every second.

Install it with `apt-get install -y --no-install-recommends prometheus` (dev.py does on CI); set PROMETHEUS_BIN to
use another binary. Without one the tests that need it skip, saying so, on a developer's machine, and fail in
CI (tests/helpers/tools.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.server import free_port
from tests.helpers.tools import missing_tool

INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus (Debian/Ubuntu), or set PROMETHEUS_BIN"


def prometheus_binary() -> str | None:
    for candidate in (os.environ.get("PROMETHEUS_BIN"), shutil.which("prometheus"), "/usr/bin/prometheus"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_prometheus() -> str:
    found = prometheus_binary()
    if found is None:
        missing_tool(f"no Prometheus binary to scrape with: {INSTALL_HINT}")
    return found


class Prometheus:
    def __init__(self, workdir: Path, target: str, *, api_key: str | None = None,
                 rule_files: list[Path] | None = None) -> None:
        self.binary = require_prometheus()
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        auth = f"\n    authorization:\n      credentials: {api_key}" if api_key else ""
        rules = "".join(f"\n  - {path}" for path in rule_files or [])
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:{rules}\n" if rules else "")
            + f"scrape_configs:\n  - job_name: vllm-batch\n    static_configs:\n      - targets: ['{target}']"
            + auth + "\n")
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Prometheus:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus did not become ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=30)
        body = response.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data["result"]]
        return result

    def wait_for_target(self, timeout: float = 60) -> dict[str, Any]:
        """Until the server has been scraped successfully a few times (rates need two samples)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.api("targets")["activeTargets"]
            if targets and targets[0]["health"] == "up" and self.query("count_over_time(up[1m])") and int(
                    float(self.query("count_over_time(up[1m])")[0]["value"][1])) >= 4:
                return dict(targets[0])
            time.sleep(0.5)
        raise AssertionError(f"the target was never scraped healthily: {self.api('targets')}\n{self.log()}")
