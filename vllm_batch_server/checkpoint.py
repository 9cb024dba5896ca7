"""The durability contract, in one place (see DESIGN.md).

A result is either committed (inside the output or error part, below the byte offset SQLite records) or not
produced yet. Results are appended in any order; a checkpoint flushes both parts, fsyncs them, and only then
commits the offsets and counters in one transaction. On resume the parts are cut back to the committed offsets
and the committed `custom_id`s are read back, so exactly the requests without a committed result run again.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from vllm_batch_server import ids
from vllm_batch_server.engines.base import Result
from vllm_batch_server.settings import Settings
from vllm_batch_server.storage import Storage
from vllm_batch_server.store import BatchRow, Checkpoint, Store

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def committed_custom_ids(part: Path, offset: int) -> set[str]:
    """The custom_ids of the results committed in `part` (its first `offset` bytes)."""
    found: set[str] = set()
    if offset <= 0 or not part.exists():
        return found
    with open(part, "rb") as fh:
        remaining = offset
        for raw in fh:
            if remaining <= 0:
                break
            remaining -= len(raw)
            if remaining < 0:  # a torn line past the committed offset: not ours
                break
            found.add(json.loads(raw)["custom_id"])
    return found


class ResultLog:
    """Appends one batch's results to its two parts and makes them durable in checkpoints."""

    def __init__(self, store: Store, storage: Storage, settings: Settings, batch: BatchRow) -> None:
        self._store = store
        self._batch_id = batch.id
        self._every = max(1, settings.checkpoint_every)
        self._seconds = settings.checkpoint_seconds
        self._durable = settings.checkpointing
        self._lock = asyncio.Lock()
        self._snapshot = asyncio.Event()  # set each time a checkpoint takes its snapshot
        self.out, self.err = storage.open_parts(batch.id, batch.output_offset, batch.error_offset)
        self.completed = batch.completed
        self.failed = batch.failed
        self.input_tokens = batch.input_tokens
        self.cached_tokens = batch.cached_tokens
        self.output_tokens = batch.output_tokens
        self.pending = 0  # results appended since the last checkpoint began
        self._synced = (batch.output_offset, batch.error_offset)  # what the last checkpoint made durable
        self._last = time.monotonic()

    @staticmethod
    def recover(storage: Storage, batch: BatchRow) -> set[str]:
        """custom_ids already committed for this batch (blocking: run it in a thread for big batches)."""
        out_part, err_part = storage.part_paths(batch.id)
        return committed_custom_ids(out_part, batch.output_offset) | committed_custom_ids(
            err_part, batch.error_offset)

    def append(self, custom_id: str, result: Result) -> None:
        response = {"status_code": result.status_code, "request_id": ids.new_request_id(), "body": result.body}
        line = {"id": ids.new_request_id(), "custom_id": custom_id, "response": response, "error": None}
        self._write(result.ok, line)
        usage = result.usage
        self.input_tokens += usage.input_tokens
        self.cached_tokens += usage.cached_tokens
        self.output_tokens += usage.output_tokens

    def append_error(self, custom_id: str, code: str, message: str) -> None:
        """A request that never reached the engine (e.g. `batch_expired`): OpenAI's top-level error."""
        line = {"id": ids.new_request_id(), "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}
        self._write(False, line)

    def _write(self, ok: bool, line: dict[str, Any]) -> None:
        data = _dumps(line).encode() + b"\n"
        if ok:
            self.out.write(data)
            self.completed += 1
        else:
            self.err.write(data)
            self.failed += 1
        self.pending += 1

    def due(self) -> bool:
        """Whether enough results, or enough time, have accumulated for a checkpoint."""
        if not self._durable or not self.pending or self._lock.locked():
            return False
        return self.pending >= self._every or time.monotonic() - self._last >= self._seconds

    async def wait_snapshot(self) -> None:
        """Return once the next checkpoint has taken its snapshot (back-pressure: results must not pile up
        behind a slow fsync or commit, since all of them would be recomputed after a crash)."""
        self._snapshot.clear()
        await self._snapshot.wait()

    async def checkpoint(self, *, final: bool = False) -> None:
        if not (self._durable or final):
            return
        async with self._lock:
            if not self.pending and not final:
                return
            # Snapshot synchronously: no result can slip in between the flush and the offsets we record.
            self.out.flush()
            self.err.flush()
            point = Checkpoint(self.out.tell(), self.err.tell(), self.completed, self.failed,
                               self.input_tokens, self.cached_tokens, self.output_tokens)
            self.pending = 0
            self._last = time.monotonic()
            self._snapshot.set()
            await asyncio.to_thread(self._fsync, point)
            await self._store.checkpoint(self._batch_id, point)
            self._synced = (point.output_offset, point.error_offset)

    def _fsync(self, point: Checkpoint) -> None:
        # Only the parts that grew: most batches never write an error line, and each fsync is a disk flush.
        if point.output_offset != self._synced[0]:
            os.fsync(self.out.fileno())
        if point.error_offset != self._synced[1]:
            os.fsync(self.err.fileno())

    def close(self) -> None:
        self.out.close()
        self.err.close()
