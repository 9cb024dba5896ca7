"""An example result handler: when a batch ends, append a one-line summary of it to a JSONL file.

Register it under the entry point group `vllm_batch.result_handlers` (see pyproject.toml beside this file):

    pip install ./examples/result_handler
    vllm-batch-server serve --result-handler summary='{"type": "summary", "path": "/var/log/batches.jsonl"}'

or, without installing, name it by module and class with the module on PYTHONPATH:

    PYTHONPATH=examples/result_handler vllm-batch-server serve \
        --result-handler summary='{"type": "summary_handler:SummaryHandler", "path": "batches.jsonl"}'

The server calls `handle` at least once per ended batch (again after a crash or a failed attempt), so the
handler makes a repeat harmless: it skips a batch whose summary for the same event is already in the file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from vllm_batch_server.handlers import EndedBatch


class SummaryHandler:
    def __init__(self, path: str, top_errors: int = 3) -> None:
        self.path = Path(path).expanduser()
        self.top_errors = top_errors

    def handle(self, batch: EndedBatch) -> None:
        if self._already_written(batch.event_id):
            return
        errors: Counter[str] = Counter()
        answered = 0
        for line in batch.results():
            response = line.get("response") or {}
            if response.get("status_code") == 200:
                answered += 1
                continue
            error = line.get("error") or (response.get("body") or {}).get("error") or {}
            errors[str(error.get("code") or error.get("type") or "unknown")] += 1
        summary = {
            "event_id": batch.event_id,
            "batch_id": batch.id,
            "status": batch.status,
            "model": batch.model,
            "answered": answered,
            "failed": sum(errors.values()),
            "top_errors": dict(errors.most_common(self.top_errors)),
            "metadata": batch.metadata,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(summary) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _already_written(self, event_id: str) -> bool:
        if not self.path.exists():
            return False
        with open(self.path, encoding="utf-8") as fh:
            return any(json.loads(line).get("event_id") == event_id for line in fh if line.strip())
