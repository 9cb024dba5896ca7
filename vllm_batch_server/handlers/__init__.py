"""Result handlers: code that runs when a batch ends (write its results to a database, copy them somewhere).

A handler is any object with a `handle(batch: EndedBatch)` method, plain or `async`. It is made once at
start-up from its configuration (`factory(**options)`), found by its `type`: a built-in name (`postgres`,
`directory`), the name of an entry point in the group `vllm_batch.result_handlers`, or `module:attribute`.
Plain `handle` methods run on the handlers' own worker threads, so a slow handler never holds up the event
loop or the batch queue; an `async` one must not block.

Handlers run at least once per ended batch: `handle` is called again after a crash, a restart, an exception or
a timeout, so it must be idempotent (e.g. an upsert keyed by batch id and custom_id, or a file replaced
whole). See service.py for how, and docs/results.md for configuring them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vllm_batch_server.store.jsonl import iter_raw_lines

ENTRY_POINT_GROUP = "vllm_batch.result_handlers"


@dataclass(frozen=True)
class EndedBatch:
    """What a handler is given: the ended batch as the API shows it, and its files on the server's disk.

    The files are the server's own (read them, never change them); a path is None when there is no such file
    (no request succeeded, none failed, or the file was deleted meanwhile).
    """

    id: str
    status: str  # completed, failed, expired or cancelled
    batch: dict[str, Any]  # the Batch object, as GET /v1/batches/{id} returns it
    input_path: Path | None
    output_path: Path | None
    error_path: Path | None
    event_id: str  # the lifecycle event that ended it: the same on every attempt
    attempt: int  # 1 on the first attempt

    @property
    def endpoint(self) -> str:
        return str(self.batch["endpoint"])

    @property
    def model(self) -> str | None:
        return self.batch.get("model")

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.batch.get("metadata") or {})

    def results(self) -> Iterator[dict[str, Any]]:
        """Every result line (the output file's, then the error file's), parsed, streamed from disk."""
        for path in (self.output_path, self.error_path):
            yield from _lines(path)

    def requests(self) -> Iterator[dict[str, Any]]:
        """Every request line of the input, parsed, in input order."""
        yield from _lines(self.input_path)


def _lines(path: Path | None) -> Iterator[dict[str, Any]]:
    if path is None:
        return
    for _, raw in iter_raw_lines(path):
        yield json.loads(raw)


class ResultHandler(Protocol):
    def handle(self, batch: EndedBatch) -> Awaitable[None] | None: ...


class HandlerConfigError(ValueError):
    """A handler's configuration cannot be used; the message names the handler."""


__all__ = ["ENTRY_POINT_GROUP", "EndedBatch", "HandlerConfigError", "ResultHandler"]
