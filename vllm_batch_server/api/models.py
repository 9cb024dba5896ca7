"""/v1/models and /health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import not_found
from vllm_batch_server.engines import served_models
from vllm_batch_server.queue.engine_owner import EngineState


def _model(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "vllm-batch"}


async def list_models(request: Request) -> Response:
    ctx = context(request)
    created = request.app.state.started_at
    names = await served_models(ctx.scheduler.engine, ctx.settings)
    return JSONResponse({"object": "list", "data": [_model(m, created) for m in names]})


async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model"]
    ctx = context(request)
    if name not in await served_models(ctx.scheduler.engine, ctx.settings):
        raise not_found("Model", name)
    return JSONResponse(_model(name, request.app.state.started_at))


async def health(request: Request) -> Response:
    ctx = context(request)
    owner = ctx.scheduler.engine_owner
    return JSONResponse({"status": "ok", "engine": ctx.settings.engine, "loaded_model": ctx.scheduler.engine.model,
                         # Every model an engine has ready (several with --max-loaded-models).
                         "loaded_models": [slot.engine.model for slot in owner.resident() if slot.state is
                                           EngineState.READY]})


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]
