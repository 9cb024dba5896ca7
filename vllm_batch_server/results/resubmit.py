"""Retrying the failed requests of ended batches as a new batch, under the same custom_ids.

A request "failed" when none of the given batches has a successful result for it: it has an error line (a
non-200 answer, `batch_expired`), or no line at all (the batch was cancelled, or failed on the engine,
before it ran). Given a batch and its earlier retries, a request that succeeded in any of them is therefore
not retried again.

The new input file is built by streaming the given batches' input files line by line, copying the lines of
failed requests byte for byte; which lines those are is found by sorting custom_ids on disk (failed_lines.py),
so memory does not grow with the batches. It is written to a temporary file, fsynced and renamed into place
like an upload, and then registered; the batch is created through the scheduler like any other, with
`metadata.retry_of` naming the batches it retries.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from vllm_batch_server.results.failed_lines import TooMany, failed_lines
from vllm_batch_server.statuses import TERMINAL, BatchStatus
from vllm_batch_server.store import jsonl
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow

META_KEY = "retry_of"
MAX_BATCHES = 16  # their ids, comma-joined, must fit one metadata value (512 characters)


class RetryError(Exception):
    """Why these batches cannot be retried; `status`, `code` and `param` are what the API answers."""

    def __init__(self, status: int, message: str, code: str, param: str | None = "batch_ids") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Source:
    """One batch to retry: its input, and its committed output (None when it has none)."""

    batch: BatchRow
    input_path: Path
    output_path: Path | None


def check_retryable(batches: list[BatchRow], blobs: Blobs) -> list[Source]:
    """The sources of a retry of `batches`, or RetryError saying why there can be none."""
    sources: list[Source] = []
    first = batches[0]
    for batch in batches:
        if batch.status not in TERMINAL:
            raise RetryError(409, f"Batch {batch.id} is {batch.status.value}; only a batch that has ended can be "
                             "retried.", "batch_not_ended")
        if batch.status is BatchStatus.FAILED and batch.in_progress_at is None:
            raise RetryError(409, f"Batch {batch.id} failed validation, so none of its requests ran; fix its "
                             "input and create a new batch.", "batch_not_retryable")
        if batch.endpoint != first.endpoint:
            raise RetryError(400, f"Batch {batch.id} uses {batch.endpoint} and batch {first.id} {first.endpoint}; "
                             "a batch has one endpoint, so retry them separately.", "mismatched_batches")
        if batch.model != first.model:
            raise RetryError(400, f"Batch {batch.id} uses the model {batch.model!r} and batch {first.id} "
                             f"{first.model!r}; a batch has one model, so retry them separately.",
                             "mismatched_batches")
        input_path = blobs.file_path(batch.input_file_id)
        if not input_path.exists():
            raise RetryError(409, f"The input file {batch.input_file_id} of batch {batch.id} was deleted, so its "
                             "requests cannot be sent again.", "input_file_deleted")
        output_path = blobs.file_path(batch.output_file_id) if batch.output_file_id else None
        if output_path is not None and not output_path.exists():
            raise RetryError(409, f"The output file {batch.output_file_id} of batch {batch.id} was deleted, so "
                             "which requests succeeded is no longer known.", "output_file_deleted")
        sources.append(Source(batch, input_path, output_path))
    return sources


def write_retry_input(sources: list[Source], blobs: Blobs, max_lines: int, file_id: str) -> tuple[int, int]:
    """Write the request lines of the failed requests, in the order of the batches given and of their inputs,
    as the file `file_id` (durably: fsync, rename, fsync the directory); returns (lines, bytes). Nothing is
    published when no request failed. Blocking: run it in a worker thread."""
    try:
        chosen = failed_lines([source.input_path for source in sources],
                              [source.output_path for source in sources], max_lines, blobs.tmp_dir)
    except TooMany:
        raise RetryError(400, f"More than {max_lines} requests failed in these batches, more than one batch may "
                         "hold; retry fewer batches at once.", "too_many_requests") from None
    path = blobs.tmp_dir / f"retry-{secrets.token_hex(8)}"
    lines = size = 0
    out = open(path, "wb")  # noqa: SIM115 - closed by publish, or below
    try:
        for source, lines_of in zip(sources, chosen, strict=True):
            if not lines_of:
                continue
            for line, raw in jsonl.iter_raw_lines(source.input_path):
                if line in lines_of:
                    out.write(raw + b"\n")
                    size += len(raw) + 1
                    lines += 1
        if lines:
            blobs.publish(out, path, blobs.file_path(file_id))
    finally:
        if not out.closed:
            out.close()
        path.unlink(missing_ok=True)
    return lines, size
