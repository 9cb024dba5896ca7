"""/v1/files: upload (streamed to disk), list, retrieve, download (streamed), delete."""

from __future__ import annotations

import sqlite3
import time

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.context import Context, context
from vllm_batch_server.api.errors import APIError, bad_request, not_found
from vllm_batch_server.api.idempotency import key_header, key_reused
from vllm_batch_server.api.multipart import read_upload
from vllm_batch_server.api.params import checked_id, expiry_seconds, query_choice, query_int
from vllm_batch_server.store.database import FileRow
from vllm_batch_server.store.idempotency import IdempotencyKey, KeyReused, fingerprint, replayed
from vllm_batch_server.store.schemas import file_object, page

# What a client may upload; `batch_output` files are made by the server only.
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_FILENAME = 255


async def create_file(request: Request) -> Response:
    ctx = context(request)
    raw_key = key_header(request)
    form = await read_upload(request, ctx.blobs, ctx.settings.max_file_bytes, digest=raw_key is not None)
    upload = form.upload
    try:
        purpose = form.fields.get("purpose")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(f"Invalid 'purpose' {purpose[:50]!r}: expected one of {', '.join(UPLOAD_PURPOSES)}.",
                              "purpose")
        if upload is None:
            raise bad_request("Missing required parameter: 'file'.", "file", "missing_required_parameter")
        created = int(time.time())
        expires_at = None
        if "expires_after[anchor]" in form.fields or "expires_after[seconds]" in form.fields:
            expires_at = created + expiry_seconds(form.fields.get("expires_after[anchor]"),
                                                  form.fields.get("expires_after[seconds]"), "expires_after")
        filename = (form.filename or "upload.jsonl")[:MAX_FILENAME]
        key = None
        if raw_key is not None:
            # The content, not the multipart framing: a retry is sent with a new boundary.
            key = IdempotencyKey("files", raw_key, fingerprint(upload.sha256, filename, dict(sorted(
                form.fields.items()))))
            if (replay := await _replayed(ctx, key)) is not None:
                return JSONResponse(file_object(replay))
        file = FileRow(id=ids.new_file_id(), filename=filename, purpose=purpose, bytes=upload.size,
                       created_at=created, expires_at=expires_at)
        # Durable before visible: bytes fsynced and renamed into place, then the row committed.
        await upload.commit(file.id)
        upload = None
        try:
            await ctx.db.insert_file(file, key)
        except sqlite3.IntegrityError:
            # The same key arrived twice at once and the other request recorded it first: answer as it did.
            ctx.blobs.remove_file(file.id)
            if key is None or (replay := await _replayed(ctx, key)) is None:
                raise
            return JSONResponse(file_object(replay))
        except BaseException:
            ctx.blobs.remove_file(file.id)
            raise
    finally:
        if upload is not None:
            upload.discard()
    return JSONResponse(file_object(file))


async def _replayed(ctx: Context, key: IdempotencyKey) -> FileRow | None:
    """The file an earlier request with this Idempotency-Key created, if there was one and it still exists."""
    try:
        file_id = await replayed(ctx.db, key)
    except KeyReused as exc:
        raise key_reused(exc) from None
    if file_id is None:
        return None
    file = await ctx.db.get_file(file_id)
    if file is None:  # deleted since: the key may start afresh
        await ctx.db.forget_idempotency_key(key.route, key.key)
    return file


async def list_files(request: Request) -> Response:
    ctx = context(request)
    limit = query_int(request, "limit", 10_000, 1, 10_000)
    order = query_choice(request, "order", "desc", ("asc", "desc"))
    purpose = request.query_params.get("purpose") or None
    after_seq = None
    if after := request.query_params.get("after"):
        anchor = await ctx.db.get_file(after) if ids.is_file_id(after) else None
        if anchor is None:
            raise bad_request(f"Invalid 'after': no file {after[:100]!r}.", "after")
        after_seq = anchor.seq
    rows = await ctx.db.list_files(after_seq=after_seq, limit=limit, descending=order == "desc",
                                      purpose=purpose)
    return JSONResponse(page([file_object(f) for f in rows[:limit]], len(rows) > limit))


async def _file(request: Request) -> FileRow:
    file_id = checked_id(request.path_params["file_id"], ids.is_file_id(request.path_params["file_id"]), "File")
    file = await context(request).db.get_file(file_id)
    if file is None:
        raise not_found("File", file_id)
    return file


async def retrieve_file(request: Request) -> Response:
    return JSONResponse(file_object(await _file(request)))


async def file_content(request: Request) -> Response:
    file = await _file(request)
    path = context(request).blobs.file_path(file.id)
    if not path.exists():
        raise not_found("File", file.id)
    return FileResponse(path, media_type="application/octet-stream", filename=file.filename,
                        content_disposition_type="attachment")


async def delete_file(request: Request) -> Response:
    ctx = context(request)
    file = await _file(request)
    user = await ctx.db.file_in_use(file.id)
    if user is not None:
        raise APIError(409, f"The file is the input of batch {user.id}, which is {user.status}; cancel it or "
                       "wait for it to end before deleting the file.", param="file_id", code="file_in_use")
    await ctx.db.delete_file(file.id)
    ctx.blobs.remove_file(file.id)
    return JSONResponse({"id": file.id, "object": "file", "deleted": True})


routes = [
    Route("/v1/files", create_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id:str}", retrieve_file, methods=["GET"]),
    Route("/v1/files/{file_id:str}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id:str}/content", file_content, methods=["GET"]),
]
