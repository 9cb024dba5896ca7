"""The operations a flow asks its shell to perform.

A *flow* is a generator (in `_core.py` and `_followup.py`) that yields these small objects and receives their
results. The shells (`_sync.py`, `_async.py`) only know how to perform each operation once, with blocking calls
or with awaits, in one driver loop each; everything else (retries, recovery of a lost create, where files go,
polling) is decided in the flow. A failed operation is thrown back into the flow as one of our exceptions
(`_errors.py`), already translated.

The Batch API's own operations are performed with the openai SDK's resources. The vllm-batch server's
extensions (docs/results.md) have none: each of their operations says which request it is (`ApiRequest`), and
the shells send that as it is, so the paths and parameters are written once, here.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

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


# ---- the vllm-batch server's extensions ------------------------------------------------------------------


@dataclass(frozen=True)
class ApiRequest:
    """One request to a path under the base URL. `lines=True`: the answer is JSONL, returned as (lines,
    headers); otherwise its JSON."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    body: Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    lines: bool = False


@dataclass(frozen=True)
class ReadResults:
    """A page of a batch's committed result lines (`kind` "output" or "errors"), from line `after_line`;
    returns `(lines, headers)`: `x-next-line` says where to go on, `x-batch-status` how the batch stood."""

    batch_id: str
    kind: str
    after_line: int
    limit: int

    def request(self) -> ApiRequest:
        return ApiRequest("GET", f"/batches/{self.batch_id}/{self.kind}",
                          params={"after_line": self.after_line, "limit": self.limit}, lines=True)


@dataclass(frozen=True)
class RetryBatches:
    """Create one batch of the requests that failed in these batches; returns the new batch's JSON. The key
    makes a repeated attempt return the batch the first one created."""

    batch_ids: tuple[str, ...]
    idempotency_key: str
    completion_window: str | None = None
    metadata: Mapping[str, str] | None = field(default=None, hash=False)

    def request(self) -> ApiRequest:
        body: dict[str, Any] = {"batch_ids": list(self.batch_ids)}
        if self.completion_window is not None:
            body["completion_window"] = self.completion_window
        if self.metadata:
            body["metadata"] = dict(self.metadata)
        return ApiRequest("POST", "/batches/retry", body=body, idempotency_key=self.idempotency_key)


def _mark_path(batch_id: str, custom_id: str) -> str:
    return f"/batches/{batch_id}/marks/{quote(custom_id, safe='')}"


@dataclass(frozen=True)
class PutMark:
    """Set (replace) the mark on one result; returns the mark's JSON."""

    batch_id: str
    custom_id: str
    label: str | None = None
    score: float | None = None
    note: str | None = None

    def request(self) -> ApiRequest:
        return ApiRequest("PUT", _mark_path(self.batch_id, self.custom_id),
                          body={"label": self.label, "score": self.score, "note": self.note})


@dataclass(frozen=True)
class DeleteMark:
    """Remove the mark on one result (a 404 `mark_not_found` when it has none)."""

    batch_id: str
    custom_id: str

    def request(self) -> ApiRequest:
        return ApiRequest("DELETE", _mark_path(self.batch_id, self.custom_id))


@dataclass(frozen=True)
class ListMarks:
    """One page of a batch's marks, in input order; returns the page's JSON (`data`, `has_more`, `last_id`)."""

    batch_id: str
    limit: int
    after: str | None = None
    label: str | None = None

    def request(self) -> ApiRequest:
        params: dict[str, Any] = {"limit": self.limit}
        if self.after:
            params["after"] = self.after
        if self.label:
            params["label"] = self.label
        return ApiRequest("GET", f"/batches/{self.batch_id}/marks", params=params)


@dataclass(frozen=True)
class ListModels:
    """The models the server serves (`GET /models`, as OpenAI's); returns the list's JSON."""

    def request(self) -> ApiRequest:
        return ApiRequest("GET", "/models")


Extension = ReadResults | RetryBatches | PutMark | DeleteMark | ListMarks | ListModels
HttpOp = Upload | CreateBatch | Retrieve | Cancel | ListBatches | Download | ServerInfo | Extension
Op = HttpOp | Sleep | Local | Notify
Flow = Generator[Op, Any, T]


def single(op: Op) -> Flow[Any]:
    """A flow of one operation."""
    return (yield op)
