"""systemd's notify protocol (`Type=notify`), written out: it is one datagram per message.

systemd passes a socket's address in `NOTIFY_SOCKET` (a path, or `@name` for Linux's abstract namespace) and
reads newline-separated `KEY=VALUE` lines from it: `READY=1` when start-up is complete, `STOPPING=1` when
shutting down, `STATUS=...` for `systemctl status`, `WATCHDOG=1` as a keep-alive when the unit sets
`WatchdogSec=` (then `WATCHDOG_USEC` says how often, and `WATCHDOG_PID` which process must send it). Outside
systemd there is no `NOTIFY_SOCKET` and every call here does nothing.

The server sends READY=1 once uvicorn listens, which is after the app's start-up: the data directory is locked
and its database open, the scheduler has recovered and started, and, with `--preload`, a model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send `lines` to systemd in one datagram; False when not run by systemd (or the socket is gone)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying systemd", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half of systemd's timeout), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


async def keep_alive(interval: float) -> None:
    """WATCHDOG=1 every `interval` seconds, from the event loop: if the loop stalls, systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


class Notifier:
    """The server's part of the protocol: ready, watchdog pings while serving, stopping."""

    def __init__(self) -> None:
        self._watchdog: asyncio.Task[None] | None = None

    def ready(self, status: str) -> None:
        if notify("READY=1", f"STATUS={status}"):
            log.info("told systemd the server is ready")
        interval = watchdog_interval()
        if interval is not None and self._watchdog is None:
            self._watchdog = asyncio.create_task(keep_alive(interval), name="systemd watchdog")

    def stopping(self) -> None:
        notify("STOPPING=1", "STATUS=stopping: running batches checkpoint and resume at the next start")

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
