"""POST /v1/batches/{id}/retry and POST /v1/batches/retry: a new batch of the failed requests of ended batches
(an extension; see retry.py). Both take an optional `completion_window` (default: the first batch's) and
`metadata`; the new batch's `metadata.retry_of` names the batches it retries, comma-separated. An
Idempotency-Key makes a repeated request return the batch the first one created.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.batches import (
    MAX_METADATA_PAIRS,
    _replayed,
    check_webhook_url,
    checked_metadata,
    window_seconds,
)
from vllm_batch_server.api.context import Context, context
from vllm_batch_server.api.errors import APIError, bad_request
from vllm_batch_server.api.idempotency import key_header
from vllm_batch_server.api.params import checked_id, json_object
from vllm_batch_server.results.resubmit import MAX_BATCHES, META_KEY, RetryError, check_retryable, write_retry_input
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.database import BatchRow, FileRow
from vllm_batch_server.store.idempotency import IdempotencyKey, fingerprint
from vllm_batch_server.store.schemas import batch_object

OPTIONS = {"completion_window", "metadata"}


async def retry_batch(request: Request) -> Response:
    raw = request.path_params["batch_id"]
    batch_id = checked_id(raw, ids.is_batch_id(raw), "Batch")
    body = await json_object(request) if (await request.body()).strip() else {}
    return await _retry(request, [batch_id], body, param="batch_id")


async def retry_batches(request: Request) -> Response:
    body = await json_object(request)
    batch_ids = body.pop("batch_ids", None)
    if batch_ids is None:
        raise bad_request("Missing required parameter: 'batch_ids'.", "batch_ids", "missing_required_parameter")
    if (not isinstance(batch_ids, list) or not batch_ids or len(batch_ids) > MAX_BATCHES
            or not all(isinstance(b, str) for b in batch_ids)):
        raise bad_request(f"Invalid 'batch_ids': expected a list of 1 to {MAX_BATCHES} batch ids.", "batch_ids")
    if len(set(batch_ids)) != len(batch_ids):
        raise bad_request("Invalid 'batch_ids': a batch is listed twice.", "batch_ids")
    return await _retry(request, batch_ids, body, param="batch_ids")


async def _retry(request: Request, batch_ids: list[str], body: dict[str, Any], *, param: str) -> Response:
    ctx = context(request)
    unknown = sorted(set(body) - OPTIONS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0][:100]}", unknown[0][:100],
                          "unknown_parameter")
    raw_key = key_header(request)
    key = IdempotencyKey("batches.retry", raw_key, fingerprint(batch_ids, body)) if raw_key else None
    metadata = checked_metadata(body.get("metadata")) or {}
    if META_KEY in metadata:
        raise bad_request(f"Invalid 'metadata': '{META_KEY}' is set by the server.", f"metadata.{META_KEY}")
    if len(metadata) >= MAX_METADATA_PAIRS:
        raise bad_request(f"Invalid 'metadata': at most {MAX_METADATA_PAIRS - 1} pairs, as the server adds "
                          f"'{META_KEY}'.", "metadata")
    check_webhook_url(metadata, ctx.settings)
    window = body.get("completion_window")
    if window is not None:
        window_seconds(window)

    if (replay := await _replayed(ctx, key)) is not None:
        return JSONResponse(batch_object(replay))
    batches: list[BatchRow] = []
    for batch_id in batch_ids:
        batch = await ctx.db.get_batch(batch_id) if ids.is_batch_id(batch_id) else None
        if batch is None:
            raise APIError(404, f"No such Batch: '{batch_id[:100]}'", param=param, code="batch_not_found")
        batches.append(batch)
    try:
        sources = check_retryable(batches, ctx.blobs)
        file_id = ids.new_file_id()
        count, size = await asyncio.to_thread(write_retry_input, sources, ctx.blobs, ctx.settings.max_batch_lines,
                                              file_id)
    except RetryError as exc:
        raise APIError(exc.status, str(exc), param=param if exc.param else None, code=exc.code) from None
    if count == 0:
        names = ", ".join(b.id for b in batches)
        raise APIError(409, f"Every request of {names} has a successful result; there is nothing to retry.",
                       param=param, code="no_failed_requests")
    return JSONResponse(batch_object(await _create(ctx, batches, file_id, size, window, metadata, key)))


async def _create(ctx: Context, batches: list[BatchRow], file_id: str, size: int, window: str | None,
                  metadata: dict[str, str], key: IdempotencyKey | None) -> BatchRow:
    first = batches[0]
    created = int(time.time())
    file = FileRow(id=file_id, filename=f"{first.id}_retry.jsonl", purpose="batch", bytes=size, created_at=created)
    try:
        await ctx.db.insert_file(file)
    except BaseException:
        ctx.blobs.remove_file(file_id)
        raise
    window = window or first.completion_window
    batch = BatchRow(id=ids.new_batch_id(), endpoint=first.endpoint, input_file_id=file_id, completion_window=window,
                     status=BatchStatus.VALIDATING, created_at=created, expires_at=created + window_seconds(window),
                     metadata={**metadata, META_KEY: ",".join(b.id for b in batches)},
                     output_expires_after=first.output_expires_after)
    try:
        await ctx.scheduler.submit(batch, key)
    except sqlite3.IntegrityError:
        # The same key arrived twice at once and the other request recorded it first: answer as it did.
        if (replay := await _replayed(ctx, key)) is None:
            raise
        await ctx.db.delete_file(file_id)
        ctx.blobs.remove_file(file_id)
        return replay
    return batch


routes = [
    # Before /v1/batches/{batch_id}: "retry" is not a batch id.
    Route("/v1/batches/retry", retry_batches, methods=["POST"]),
    Route("/v1/batches/{batch_id:str}/retry", retry_batch, methods=["POST"]),
]
