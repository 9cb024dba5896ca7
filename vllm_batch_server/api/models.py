"""/v1/models and /health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import not_found


def _model(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "vllm-batch"}


async def list_models(request: Request) -> Response:
    ctx = context(request)
    created = request.app.state.started_at
    return JSONResponse({"object": "list", "data": [_model(m, created) for m in ctx.settings.models]})


async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model"]
    if name not in context(request).settings.models:
        raise not_found("Model", name)
    return JSONResponse(_model(name, request.app.state.started_at))


async def health(request: Request) -> Response:
    ctx = context(request)
    return JSONResponse({"status": "ok", "engine": ctx.settings.engine, "loaded_model": ctx.scheduler.engine.model})


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]
