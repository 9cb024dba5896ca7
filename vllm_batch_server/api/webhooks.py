"""GET /v1/batches/{batch_id}/webhooks: the webhook deliveries of a batch and how each attempt went (ours)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import not_found
from vllm_batch_server.api.params import checked_id
from vllm_batch_server.observers.webhooks import delivery_object


async def list_deliveries(request: Request) -> Response:
    ctx = context(request)
    raw = request.path_params["batch_id"]
    batch_id = checked_id(raw, ids.is_batch_id(raw), "Batch")
    if await ctx.db.get_batch(batch_id) is None:
        raise not_found("Batch", batch_id)
    data = [delivery_object(row) for row in await ctx.db.deliveries_of(batch_id)]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": False})


routes = [Route("/v1/batches/{batch_id:str}/webhooks", list_deliveries, methods=["GET"])]
