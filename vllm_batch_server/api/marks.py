"""/v1/batches/{id}/marks: curation marks on results, keyed by custom_id (an extension; see marks.py).

PUT sets a mark (replacing the previous one), DELETE removes it, GET lists a batch's marks in input order
(`after=<custom_id>`, `limit`, and `label` to list one label only).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import APIError, bad_request, not_found
from vllm_batch_server.api.params import checked_id, json_object, query_int
from vllm_batch_server.results.marks import MarkError, parse_mark
from vllm_batch_server.store.database import BatchRow

MAX_CUSTOM_ID = 4096


class CustomIdConvertor(Convertor[str]):
    """A custom_id in a path: may contain slashes, never empty (Starlette's `path` also matches nothing, which
    made `GET .../marks/` a 405 from the PUT route instead of a 404)."""

    regex = ".+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("custom_id", CustomIdConvertor())


def mark_object(row: Any) -> dict[str, Any]:
    return {"object": "batch.mark", "batch_id": row["batch_id"], "custom_id": row["custom_id"],
            "label": row["label"], "score": row["score"], "note": row["note"], "updated_at": row["updated_at"]}


async def _batch(request: Request) -> BatchRow:
    raw = request.path_params["batch_id"]
    batch_id = checked_id(raw, ids.is_batch_id(raw), "Batch")
    batch = await context(request).db.get_batch(batch_id)
    if batch is None:
        raise not_found("Batch", batch_id)
    return batch


def _custom_id(request: Request) -> str:
    custom_id: str = request.path_params["custom_id"]
    if not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise bad_request(f"Invalid custom_id: expected 1 to {MAX_CUSTOM_ID} characters.", "custom_id")
    return custom_id


def _api_error(exc: MarkError) -> APIError:
    return APIError(exc.status, str(exc), param=exc.param, code=exc.code)


async def put_mark(request: Request) -> Response:
    ctx = context(request)
    batch = await _batch(request)
    custom_id = _custom_id(request)
    try:
        mark = parse_mark(await json_object(request))
        await ctx.marks.check(batch, custom_id)
    except MarkError as exc:
        raise _api_error(exc) from None
    await ctx.db.set_mark(batch.id, custom_id, mark.label, mark.score, mark.note, int(time.time()))
    row = await ctx.db.get_mark(batch.id, custom_id)
    return JSONResponse(mark_object(row))


async def delete_mark(request: Request) -> Response:
    ctx = context(request)
    batch = await _batch(request)
    custom_id = _custom_id(request)
    if not await ctx.db.delete_mark(batch.id, custom_id):
        raise APIError(404, f"Batch {batch.id} has no mark on custom_id '{custom_id[:200]}'.", param="custom_id",
                       code="mark_not_found")
    return JSONResponse({"object": "batch.mark", "batch_id": batch.id, "custom_id": custom_id, "deleted": True})


async def list_marks(request: Request) -> Response:
    ctx = context(request)
    batch = await _batch(request)
    limit = query_int(request, "limit", 100, 1, 10_000)
    label = request.query_params.get("label") or None
    after_line = 0
    if after := request.query_params.get("after"):
        line = await ctx.db.request_line(batch.id, after)
        if line is None:
            raise bad_request(f"Invalid 'after': batch {batch.id} has no request with custom_id {after[:100]!r}.",
                              "after")
        after_line = line
    rows = await ctx.db.list_marks(batch.id, after_line=after_line, limit=limit, label=label)
    data = [mark_object(row) for row in rows[:limit]]
    return JSONResponse({"object": "list", "data": data,
                         "first_id": data[0]["custom_id"] if data else None,
                         "last_id": data[-1]["custom_id"] if data else None,
                         "has_more": len(rows) > limit})


routes = [
    Route("/v1/batches/{batch_id:str}/marks", list_marks, methods=["GET"]),
    Route("/v1/batches/{batch_id:str}/marks/{custom_id:custom_id}", put_mark, methods=["PUT"]),
    Route("/v1/batches/{batch_id:str}/marks/{custom_id:custom_id}", delete_mark, methods=["DELETE"]),
]
