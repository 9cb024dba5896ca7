"""/v1/batches: create, retrieve, list (newest first, cursor-paginated, optionally filtered), cancel."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.context import Context, context
from vllm_batch_server.api.errors import APIError, bad_request, not_found
from vllm_batch_server.api.idempotency import key_header, key_reused
from vllm_batch_server.api.params import checked_id, expiry_seconds, json_object, query_int
from vllm_batch_server.engines.base import SUPPORTED_ENDPOINTS
from vllm_batch_server.observers import webhooks
from vllm_batch_server.queue import priority
from vllm_batch_server.queue.scheduler import NotCancellable
from vllm_batch_server.settings import Settings
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.database import BatchRow
from vllm_batch_server.store.idempotency import IdempotencyKey, KeyReused, fingerprint, replayed
from vllm_batch_server.store.schemas import batch_object, page

CREATE_FIELDS = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
# OpenAI's metadata limits.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
def window_seconds(value: Any) -> int:
    seconds = priority.window_seconds(value)
    if seconds is None:
        raise bad_request("Invalid 'completion_window': expected '24h' (or a duration such as '90m', '2h' "
                          "or '30s', at most 30 days).", "completion_window")
    return seconds


def checked_metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("Invalid 'metadata': expected an object of string keys and values.", "metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise bad_request(f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} key-value pairs are allowed.",
                          "metadata")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise bad_request(f"Invalid 'metadata': keys are at most {MAX_METADATA_KEY} characters.",
                              f"metadata.{key[:MAX_METADATA_KEY]}")
        if not isinstance(item, str):
            raise bad_request("Invalid 'metadata': values must be strings.", f"metadata.{key}")
        if len(item) > MAX_METADATA_VALUE:
            raise bad_request(f"Invalid 'metadata': values are at most {MAX_METADATA_VALUE} characters.",
                              f"metadata.{key}")
    return value



def check_webhook_url(metadata: dict[str, str] | None, settings: Settings) -> None:
    """Refuse a `metadata.webhook_url` that no webhook would be sent to (create and retry alike): refused rather
    than ignored, as its owner expects a webhook."""
    if metadata and (url := metadata.get(webhooks.METADATA_KEY)) is not None:
        refusal = webhooks.check_batch_url(url, settings)
        if refusal is not None:
            raise APIError(400, f"Invalid 'metadata.{webhooks.METADATA_KEY}': {refusal}.",
                           param=f"metadata.{webhooks.METADATA_KEY}", code="webhook_url_not_allowed")

async def create_batch(request: Request) -> Response:
    ctx = context(request)
    body = await json_object(request)
    raw_key = key_header(request)
    key = IdempotencyKey("batches", raw_key, fingerprint(body)) if raw_key else None
    # The key first: a retry gets the batch it created even if what it refers to has changed since (its input
    # file deleted once the batch ended, a setting changed by a restart).
    if (replay := await _replayed(ctx, key)) is not None:
        return JSONResponse(batch_object(replay))
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0][:100]}", unknown[0][:100],
                          "unknown_parameter")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise bad_request(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    endpoint = body["endpoint"]
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise bad_request(f"Invalid 'endpoint' {str(endpoint)[:100]!r}: this server supports "
                          f"{', '.join(SUPPORTED_ENDPOINTS)}.", "endpoint", "unsupported_endpoint")
    window = window_seconds(body["completion_window"])
    metadata = checked_metadata(body.get("metadata"))
    check_webhook_url(metadata, ctx.settings)
    output_expiry = None
    if (policy := body.get("output_expires_after")) is not None:
        if not isinstance(policy, dict):
            raise bad_request("Invalid 'output_expires_after': expected an object.", "output_expires_after")
        output_expiry = expiry_seconds(policy.get("anchor"), policy.get("seconds"), "output_expires_after")

    input_file_id = body["input_file_id"]
    file = None
    if isinstance(input_file_id, str) and ids.is_file_id(input_file_id):
        file = await ctx.db.get_file(input_file_id)
    if file is None:
        raise APIError(404, f"No such File: '{str(input_file_id)[:100]}'", param="input_file_id",
                       code="file_not_found")
    if file.purpose != "batch":
        raise bad_request(f"The input file has purpose {file.purpose!r}; a batch needs a file uploaded with "
                          "purpose 'batch'.", "input_file_id", "invalid_file_purpose")

    created = int(time.time())
    batch = BatchRow(id=ids.new_batch_id(), endpoint=endpoint, input_file_id=file.id,
                     completion_window=body["completion_window"], status=BatchStatus.VALIDATING,
                     created_at=created, expires_at=created + window, metadata=metadata,
                     output_expires_after=output_expiry)
    try:
        await ctx.scheduler.submit(batch, key)
    except sqlite3.IntegrityError:
        # The same key arrived twice at once and the other request recorded it first: answer as it did.
        if (replay := await _replayed(ctx, key)) is None:
            raise
        return JSONResponse(batch_object(replay))
    return JSONResponse(batch_object(batch))


async def _replayed(ctx: Context, key: IdempotencyKey | None) -> BatchRow | None:
    """The batch an earlier request with this Idempotency-Key created, if there was one and it still exists."""
    if key is None:
        return None
    try:
        batch_id = await replayed(ctx.db, key)
    except KeyReused as exc:
        raise key_reused(exc) from None
    return await ctx.db.get_batch(batch_id) if batch_id else None


async def _batch(request: Request) -> BatchRow:
    raw = request.path_params["batch_id"]
    batch_id = checked_id(raw, ids.is_batch_id(raw), "Batch")
    batch = await context(request).db.get_batch(batch_id)
    if batch is None:
        raise not_found("Batch", batch_id)
    return batch


async def retrieve_batch(request: Request) -> Response:
    return JSONResponse(batch_object(await _batch(request)))


async def list_batches(request: Request) -> Response:
    ctx = context(request)
    limit = query_int(request, "limit", 20, 1, 100)
    after_seq = None
    if after := request.query_params.get("after"):
        anchor = await ctx.db.get_batch(after) if ids.is_batch_id(after) else None
        if anchor is None:
            raise bad_request(f"Invalid 'after': no batch {after[:100]!r}.", "after")
        after_seq = anchor.seq
    rows = await ctx.db.list_batches(after_seq=after_seq, limit=limit, statuses=_status_filter(request),
                                     model=request.query_params.get("model") or None)
    return JSONResponse(page([batch_object(b) for b in rows[:limit]], len(rows) > limit))


def _status_filter(request: Request) -> list[str]:
    """`?status=in_progress,validating`: our extension (OpenAI's list has no filters), for the dashboard."""
    raw = request.query_params.get("status") or ""
    wanted = [part.strip() for part in raw.split(",") if part.strip()]
    known = {status.value for status in BatchStatus}
    for name in wanted:
        if name not in known:
            raise bad_request(f"Invalid 'status' {name[:50]!r}: expected one or more of "
                              f"{', '.join(s.value for s in BatchStatus)}, separated by commas.", "status")
    return wanted


async def cancel_batch(request: Request) -> Response:
    ctx = context(request)
    batch = await _batch(request)
    try:
        current = await ctx.scheduler.cancel(batch.id)
    except NotCancellable as exc:
        raise APIError(409, str(exc), param="batch_id", code="batch_not_cancellable") from None
    if current is None:
        raise not_found("Batch", batch.id)
    return JSONResponse(batch_object(current))


routes = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id:str}", retrieve_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id:str}/cancel", cancel_batch, methods=["POST"]),
]
