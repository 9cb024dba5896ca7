"""Database rows rendered as the OpenAI objects the official SDK parses (openai.types.Batch, FileObject), and
our own objects in the same style (events)."""

from __future__ import annotations

from typing import Any

from vllm_batch_server.store.database import BatchRow, FileRow
from vllm_batch_server.store.lifecycle import Event


def file_object(file: FileRow) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "expires_at": file.expires_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(batch: BatchRow) -> dict[str, Any]:
    total_tokens = batch.input_tokens + batch.output_tokens
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id if batch.status in _ENDED else None,
        "error_file_id": batch.error_file_id if batch.status in _ENDED else None,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "usage": {
            "input_tokens": batch.input_tokens,
            "input_tokens_details": {"cached_tokens": batch.cached_tokens},
            "output_tokens": batch.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": total_tokens,
        },
        "metadata": batch.metadata,
    }


# The result file ids are chosen at the start of finalizing; they are shown once the files exist.
_ENDED = ("completed", "failed", "expired", "cancelled")


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def event_object(event: Event) -> dict[str, Any]:
    """One line of the lifecycle's event log (our extension: GET /v1/events and its stream)."""
    return {
        "object": "event",
        "id": event.id,
        "seq": event.seq,
        "type": event.type,
        "created_at": event.created_at,
        "data": {"id": event.batch_id},
    }
