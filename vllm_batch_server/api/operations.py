"""GET /metrics, /ready and /status: for Prometheus, load balancers and probes, and the dashboard.

/health (api/models.py) and /ready are open without the API key, as probes send none; /metrics needs the key
unless `--metrics-public`; /status needs it like every /v1 route (it names batches).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server.api import readiness
from vllm_batch_server.api.context import context
from vllm_batch_server.observers import metrics

# Seconds a load balancer is told to wait before asking /ready again.
READY_RETRY_AFTER = "5"


async def metrics_endpoint(request: Request) -> Response:
    ctx = context(request)
    await ctx.monitor.snapshot()  # the numbers read from SQLite, at most a second old
    body, content_type = metrics.render(ctx.metrics)
    return Response(body, media_type=content_type)


async def ready(request: Request) -> Response:
    reasons = await readiness.readiness(context(request))
    if reasons:
        return JSONResponse({"ready": False, "reasons": reasons}, status_code=503,
                            headers={"retry-after": READY_RETRY_AFTER})
    return JSONResponse({"ready": True, "reasons": []})


async def status(request: Request) -> Response:
    return JSONResponse(await readiness.status(context(request)))


routes = [
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/status", status, methods=["GET"]),
]
