"""Running out of our own resources: disk space, file descriptors, memory.

None of these is the caller's fault or the engine's: the operator frees the resource and the work goes on. So
the API answers them with a status that says "retry later" (507 for disk, 503 for the rest) instead of a 500,
and a running batch that meets one is paused and retried, never failed or charged an engine failure.
"""

from __future__ import annotations

import errno
import sqlite3
from enum import Enum


class Exhausted(str, Enum):
    DISK = "out of disk space"
    FILES = "out of file descriptors"
    MEMORY = "out of memory"


_ERRNOS = {errno.ENOSPC: Exhausted.DISK, errno.EDQUOT: Exhausted.DISK, errno.EMFILE: Exhausted.FILES,
           errno.ENFILE: Exhausted.FILES, errno.ENOMEM: Exhausted.MEMORY}

# SQLite's primary result codes (sqlite3 exposes the names only from Python 3.11) and what its messages say
# when the operating system refused: "unable to open database file" is how running out of descriptors shows.
_SQLITE_CODES = {13: Exhausted.DISK, 7: Exhausted.MEMORY, 14: Exhausted.FILES}
_SQLITE_MESSAGES = {"database or disk is full": Exhausted.DISK, "disk is full": Exhausted.DISK,
                    "out of memory": Exhausted.MEMORY, "unable to open database file": Exhausted.FILES}
# An engine (or library) that reports the condition only in its message, e.g. vLLM's engine core process.
_MESSAGES = {"No space left on device": Exhausted.DISK, "Too many open files": Exhausted.FILES,
             "Cannot allocate memory": Exhausted.MEMORY}


def exhausted(exc: BaseException | None) -> Exhausted | None:
    """What ran out, if `exc` (or an exception it was raised from) says a resource of ours ran out."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = _classify(exc)
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _classify(exc: BaseException) -> Exhausted | None:
    if isinstance(exc, MemoryError):
        return Exhausted.MEMORY
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
        return _ERRNOS[exc.errno]
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _SQLITE_CODES:
            return _SQLITE_CODES[code & 0xFF]
        text = str(exc)
        return next((kind for message, kind in _SQLITE_MESSAGES.items() if message in text), None)
    text = str(exc)
    return next((kind for message, kind in _MESSAGES.items() if message in text), None)


def is_disk_full(exc: BaseException | None) -> bool:
    return exhausted(exc) is Exhausted.DISK
