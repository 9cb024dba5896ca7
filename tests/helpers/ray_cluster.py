"""A local Ray cluster for the Ray replica tests: `ray start --head --block` in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.server import free_port


@dataclass
class RayHead:
    port: int
    temp_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run_driver(self, code: str, timeout: float = 120.0) -> str:
        """Run `code` in a separate Python process connected to this cluster as a Ray driver (`ray` imported
        and initialised); its stdout."""
        script = f"import ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}\n"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"Ray driver failed:\n{done.stdout}\n{done.stderr[-4000:]}")
        return done.stdout

    def stop(self) -> None:
        """End the processes this head started (its process group), never other Ray clusters on the machine."""
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                self.process.poll()
                time.sleep(0.2)
            if not _group_alive(self.process.pid):
                break
        self.process.poll()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def start_head(num_cpus: int = 4, timeout: float = 120.0) -> RayHead:
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise RuntimeError("the `ray` command is not installed")
    # Short: Ray puts unix sockets under it, and their paths may not exceed 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    log_path = temp_dir.parent / f"{temp_dir.name}.log"
    args = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BATCH_"))}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(port, temp_dir, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            head.stop()
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if b"Ray runtime started" in log_path.read_bytes():
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return head
        time.sleep(0.5)
    head.stop()
    raise RuntimeError(f"the Ray head did not start within {timeout}s:\n{log_path.read_text()[-4000:]}")
