"""Curation marks: a label, a score and a note on one result of a batch, keyed by its `custom_id`.

A mark is accepted only for a `custom_id` that is in the batch's input, so a typo is an error rather than a
mark that no export ever finds. The check uses an index (custom_id → input line) built from the input file
the first time a batch is marked, in chunks on a worker thread; it also lists marks in input order.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow, Database
from vllm_batch_server.store.jsonl import iter_requests

FIELDS = ("label", "score", "note")
MAX_LABEL = 64
MAX_NOTE = 4096
CHUNK_ROWS = 5000


class MarkError(Exception):
    """A mark that cannot be set; `status`, `code` and `param` are what the API answers."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Mark:
    label: str | None
    score: float | None
    note: str | None


def parse_mark(body: dict[str, Any]) -> Mark:
    """A mark from a request body `{"label", "score", "note"}`; every field may be null or left out."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise MarkError(400, f"Unrecognized request argument supplied: {unknown[0][:100]}", "unknown_parameter",
                        unknown[0][:100])
    label, score, note = body.get("label"), body.get("score"), body.get("note")
    if label is not None and (not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL):
        raise MarkError(400, f"Invalid 'label': expected a string of 1 to {MAX_LABEL} characters, or null.",
                        "invalid_value", "label")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)
                              or not math.isfinite(score)):
        raise MarkError(400, "Invalid 'score': expected a finite number, or null.", "invalid_value", "score")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise MarkError(400, f"Invalid 'note': expected a string of at most {MAX_NOTE} characters, or null.",
                        "invalid_value", "note")
    if label is None and score is None and note is None:
        raise MarkError(400, "A mark needs at least one of 'label', 'score' or 'note'; DELETE the mark to remove "
                        "it.", "invalid_value", "label")
    return Mark(label, float(score) if score is not None else None, note)


def _chunks(path: Path) -> Iterator[list[tuple[str, int]]]:
    requests = ((custom_id, number) for number, custom_id, _ in iter_requests(path))
    while chunk := list(islice(requests, CHUNK_ROWS)):
        yield chunk


class MarkIndex:
    """Builds and consults the custom_id → input line index of marked batches."""

    def __init__(self, db: Database, blobs: Blobs) -> None:
        self._db = db
        self._blobs = blobs
        self._building: dict[str, asyncio.Lock] = {}

    async def check(self, batch: BatchRow, custom_id: str) -> int:
        """The input line of `custom_id` in `batch`; raises MarkError if it cannot be marked."""
        if batch.status is BatchStatus.VALIDATING:
            raise MarkError(409, f"Batch {batch.id} is still validating; its requests can be marked once it "
                            "runs.", "batch_not_ready", "batch_id")
        if batch.in_progress_at is None and batch.status is BatchStatus.FAILED:
            raise MarkError(409, f"Batch {batch.id} failed validation; it has no results to mark.",
                            "batch_not_ready", "batch_id")
        await self.ensure(batch)
        line = await self._db.request_line(batch.id, custom_id)
        if line is None:
            raise MarkError(404, f"Batch {batch.id} has no request with custom_id '{custom_id[:200]}'.",
                            "custom_id_not_found", "custom_id")
        return line

    async def ensure(self, batch: BatchRow) -> None:
        if await self._db.request_lines_built(batch.id) is not None:
            return
        lock = self._building.setdefault(batch.id, asyncio.Lock())
        try:
            async with lock:
                if await self._db.request_lines_built(batch.id) is not None:
                    return
                path = self._blobs.file_path(batch.input_file_id)
                if not path.exists():
                    raise MarkError(409, f"The input file {batch.input_file_id} of batch {batch.id} was deleted; "
                                    "marks are checked against it.", "input_file_deleted", "batch_id")
                chunks = _chunks(path)
                lines = 0
                empty: list[tuple[str, int]] = []
                while chunk := await asyncio.to_thread(next, chunks, empty):
                    await self._db.add_request_lines(batch.id, chunk)
                    lines += len(chunk)
                await self._db.finish_request_lines(batch.id, lines)
        finally:
            if not lock.locked():
                self._building.pop(batch.id, None)
