"""The operations a flow asks its shell to perform, and the one loop that runs a flow.

A *flow* is a generator in `_core.py` that yields these small objects and receives their results. The shells
(`_sync.py`, `_async.py`) only know how to perform each operation once, with blocking calls or with awaits;
everything else (retries, recovery of a lost create, where files go, polling) is decided in the flow.
A failed operation is thrown back into the flow as one of our exceptions (`_errors.py`), already translated.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vllm_batch._status import BatchStatus

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    """Upload a local JSONL file for a batch; returns the file id. The key makes a repeated upload return
    the same file on servers that honour `Idempotency-Key`."""

    path: Path
    filename: str
    idempotency_key: str | None = None


@dataclass(frozen=True)
class CreateBatch:
    """Create one server batch; returns the `openai.types.Batch`."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] = field(hash=False)
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Retrieve:
    batch_id: str


@dataclass(frozen=True)
class Cancel:
    batch_id: str


@dataclass(frozen=True)
class ListBatches:
    """One page of batches, newest first; returns `(batches, has_more)`."""

    limit: int
    after: str | None = None


@dataclass(frozen=True)
class Download:
    """Stream a file's content to `path` (created or truncated); returns nothing."""

    file_id: str
    path: Path


@dataclass(frozen=True)
class ServerInfo:
    """Ask a vllm-batch-server what it is doing (`GET /health`, no key, a few seconds at most); returns the
    JSON object, or None when the backend has no such route or does not answer. Never raises, never retried."""


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Local:
    """Disk work that can be large (splitting, concatenating, indexing): the async shell runs it in a thread."""

    fn: Callable[[], Any]


@dataclass(frozen=True)
class Notify:
    """Call the user's callback (the async shell awaits it if it is a coroutine function)."""

    fn: Callable[[BatchStatus], Any]
    status: BatchStatus


HttpOp = Upload | CreateBatch | Retrieve | Cancel | ListBatches | Download | ServerInfo
Op = HttpOp | Sleep | Local | Notify
Flow = Generator[Op, Any, T]


def single(op: Op) -> Flow[Any]:
    """A flow of one operation."""
    return (yield op)
