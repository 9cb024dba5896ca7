"""GET /v1/batches/{id}/handlers: how each result handler's run for this batch stands (an extension; see
handlers/service.py). A batch that has not ended yet, or ended before any handler was configured, has none."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import not_found
from vllm_batch_server.api.params import checked_id


async def batch_handlers(request: Request) -> Response:
    ctx = context(request)
    raw = request.path_params["batch_id"]
    batch_id = checked_id(raw, ids.is_batch_id(raw), "Batch")
    if await ctx.db.get_batch(batch_id) is None:
        raise not_found("Batch", batch_id)
    runs = [{"name": row["handler"], "status": row["status"], "attempts": row["attempts"],
             "last_error": row["last_error"], "updated_at": row["updated_at"]}
            for row in await ctx.db.handler_runs_of(batch_id)]
    return JSONResponse({"object": "list", "data": runs})


routes = [Route("/v1/batches/{batch_id:str}/handlers", batch_handlers, methods=["GET"])]
