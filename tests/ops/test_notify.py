"""systemd's notify protocol against a test socket: READY=1 once the server listens with its start-up done (the
engine loaded, with --preload), WATCHDOG=1 while it runs, STOPPING=1 when it stops."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import make_server
from vllm_batch_server.ops import notify


class NotifySocket:
    """What systemd listens on: a datagram socket whose messages we collect with their arrival time."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.on_message: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))
            for callback in list(self.on_message):
                callback(data.decode())  # type: ignore[operator]

    def wait_for(self, prefix: str, timeout: float = 60) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for moment, message in list(self.messages):
                if message.startswith(prefix):
                    return moment, message
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} within {timeout}s: {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, NotifySocket]]:
    path = str(tmp_path / "notify.sock")
    listener = NotifySocket(path)
    yield path, listener
    listener.close()


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(notify_socket: tuple[str, NotifySocket],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, listener = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.notify("READY=1", "STATUS=serving")
    assert listener.wait_for("READY=1")[1] == "READY=1\nSTATUS=serving"

    name = f"vllm-batch-test-{os.getpid()}"
    abstract = NotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("STOPPING=1")
        assert abstract.wait_for("STOPPING=1")[1] == "STOPPING=1"
    finally:
        abstract.close()

    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.notify("READY=1") is False  # not run by systemd: nothing to do
    monkeypatch.setenv("NOTIFY_SOCKET", str(Path(path).parent / "gone.sock"))
    assert notify.notify("READY=1") is False  # a vanished socket is logged, never raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    assert notify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert notify.watchdog_interval() is None


def test_the_server_speaks_the_protocol(notify_socket: tuple[str, NotifySocket], tmp_path: Path) -> None:
    path, listener = notify_socket
    server = make_server(tmp_path / "data", extra_args=["--preload"],
                         env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    checked: dict[str, object] = {}

    def on_ready(message: str) -> None:
        # At the very moment systemd hears READY=1, the server must already answer, with its engine loaded.
        if message.startswith("READY=1") and not checked:
            try:
                checked["status"] = httpx.get(server.root_url + "/status", timeout=5).json()
            except httpx.HTTPError as exc:
                checked["status"] = exc

    listener.on_message.append(on_ready)
    server.start()
    try:
        _, ready = listener.wait_for("READY=1")
        assert "STATUS=serving echo-model, echo-embed" in ready
        deadline = time.monotonic() + 5
        while "status" not in checked and time.monotonic() < deadline:
            time.sleep(0.02)
        status = checked["status"]
        assert isinstance(status, dict), status
        assert status["engine"]["state"] == "ready" and status["engine"]["model"] == "echo-model"
        assert listener.messages[0][1] == ready  # nothing before it

        time.sleep(1.0)
        pings = [m for _, m in listener.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 3, listener.messages  # every 0.2 s: half of WATCHDOG_USEC

        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGTERM)
        listener.wait_for("STOPPING=1", timeout=30)
        # uvicorn ends by re-raising the SIGTERM it handled, which systemd counts as a clean exit.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.log()  # a graceful stop, not a kill
    finally:
        server.kill()
