"""One server per data directory: an exclusive lock held by the serving process for its whole life.

Two servers on one directory would each clean up `tmp/` at start-up (deleting the other's uploads in flight) and
each resume the same running batch (computing it twice). So the serving process takes an exclusive `flock` on
`server.lock` in the data directory before anything else touches the directory, and keeps it until it exits.

Why `flock` on an open descriptor rather than "a file that exists means locked": the kernel drops the lock when
the process dies, however it dies, so a `kill -9` or a power cut never leaves a stale lock that blocks the next
start. The file stays behind between runs; its content (the holder's pid, host and port) is only there so the
refused server can say who holds the directory. The descriptor is closed in any program the server starts
(Python opens files non-inheritable), so a spawned engine process that outlives a killed server does not keep the
directory locked; a process merely forked from the server would, and the refusal then says so.

`server.lock` sits at the top of the data directory, beside the database, never inside `files/`, `tmp/` or
`batches/`, so nothing that scans or cleans data ever sees it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "server.lock"


class DataDirInUse(RuntimeError):
    """Another live process holds the data directory; the message names it (pid, port) when it could say."""

    def __init__(self, data_dir: Path, holder: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.holder = holder
        who = ", ".join(f"{key} {holder[key]}" for key in ("pid", "host", "port") if holder.get(key) is not None)
        pid = holder.get("pid")
        if isinstance(pid, int) and not _alive(pid):
            # The lock outlived its server: a process forked from it (an engine worker, say) still has the file
            # open. Naming the dead server alone would send the user looking for a process that is not there.
            super().__init__(
                f"the data directory {data_dir} is still locked by a process left behind by the vllm-batch-server "
                f"that held it ({who}, which has exited), such as its engine; stop that process (see `fuser "
                f"{data_dir / LOCK_NAME}`), or give this server its own --data-dir")
            return
        super().__init__(
            f"the data directory {data_dir} is in use by another vllm-batch-server ({who or 'process unknown'}); "
            "stop that server first, or give this one its own --data-dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


@dataclass
class _Held:
    fd: int
    users: int


# Locks this process holds, by resolved directory: the command line takes the lock before uvicorn starts (so a
# refusal is a clean message, not a traceback) and the app's lifespan takes it again (so an app embedded some
# other way is protected too); both must count as one holder, since a second flock on another descriptor of the
# same file would conflict with our own.
_held: dict[str, _Held] = {}


@contextlib.contextmanager
def locked(data_dir: Path, *, host: str | None = None, port: int | None = None) -> Iterator[Path]:
    """Hold the data directory's lock for the duration of the block (re-entrant within this process); raises
    DataDirInUse when another process holds it. Creates the directory if needed; yields the lock file's path."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = str(data_dir.resolve())
    held = _held.get(key)
    if held is None:
        held = _held[key] = _Held(_acquire(data_dir, host, port), 0)
    held.users += 1
    try:
        yield data_dir / LOCK_NAME
    finally:
        held.users -= 1
        if held.users == 0:
            del _held[key]
            os.close(held.fd)  # closing the last descriptor of the open file releases the flock


def _acquire(data_dir: Path, host: str | None, port: int | None) -> int:
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DataDirInUse(data_dir, holder) from None
    except BaseException:
        os.close(fd)
        raise
    # Ours now: replace whatever an earlier (dead) holder wrote with who we are.
    record = json.dumps({"pid": os.getpid(), "host": host, "port": port, "since": int(time.time())}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record + b"\n", 0)
    return fd


def _holder(fd: int, attempts: int = 20) -> dict[str, Any]:
    """What the holder wrote about itself. It writes right after taking the lock, so a reader that comes in
    between sees an empty file for a moment: look again briefly before giving up."""
    for _ in range(attempts):
        raw = os.pread(fd, 4096, 0)
        with contextlib.suppress(ValueError):
            found = json.loads(raw)
            if isinstance(found, dict):
                return found
        time.sleep(0.01)
    return {}
