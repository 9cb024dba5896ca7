"""The ASGI application: routes, error handlers, optional auth, and a lifespan that runs the scheduler."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from vllm_batch_server.api import (
    batches,
    events,
    files,
    handlers,
    marks,
    models,
    online,
    openapi,
    operations,
    results,
    retry,
    ui,
)
from vllm_batch_server.api import webhooks as webhook_routes
from vllm_batch_server.api.auth import BearerAuth
from vllm_batch_server.api.context import Context
from vllm_batch_server.api.deadlines import BodyIdleTimeout
from vllm_batch_server.api.errors import (
    APIError,
    on_api_error,
    on_http_exception,
    on_storage_error,
    on_unexpected,
)
from vllm_batch_server.api.guard import WebGuard, allowed_names
from vllm_batch_server.engines import check_settings as check_engine_settings
from vllm_batch_server.engines import create_engine, residency
from vllm_batch_server.handlers.loading import load_handlers
from vllm_batch_server.handlers.service import HandlerService
from vllm_batch_server.observers import metrics, webhooks
from vllm_batch_server.observers.monitor import Monitor
from vllm_batch_server.observers.webhooks import Webhooks
from vllm_batch_server.queue.scheduler import Scheduler
from vllm_batch_server.results.marks import MarkIndex
from vllm_batch_server.results.partial import CommittedResults
from vllm_batch_server.settings import Settings
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.data_dir_lock import locked
from vllm_batch_server.store.database import Database
from vllm_batch_server.store.events import EventLog
from vllm_batch_server.store.lifecycle import Lifecycle

log = logging.getLogger("vllm_batch_server")


def create_app(settings: Settings) -> Starlette:
    configured_handlers = load_handlers(settings.result_handlers)  # a bad configuration fails here, at once
    webhooks.check_settings(settings)  # raises SettingsError: refuse to start rather than drop events
    check_engine_settings(settings)  # raises SettingsError: a bad --backend is one line, not a failed start-up
    residency.check_settings(settings)  # raises SettingsError: several resident models that cannot fit

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Before anything touches the data directory (cli.py has usually taken it already; this is the same
        # lock, counted twice). Another server holding it is refused here.
        with locked(settings.data_dir, host=settings.host, port=settings.port):
            async with _serving(app):
                yield

    @asynccontextmanager
    async def _serving(app: Starlette) -> AsyncIterator[None]:
        blobs = Blobs(settings.data_dir)
        blobs.prepare()
        db = await Database.open(settings.db_path)
        lifecycle = Lifecycle(db)
        events = EventLog(db, lifecycle)
        app_metrics = metrics.Metrics()  # this app's registry: never the process's global one
        scheduler = Scheduler(db, blobs, create_engine(settings), settings, lifecycle,
                              metrics.SchedulerMetrics(app_metrics), make_engine=lambda: create_engine(settings))
        result_handlers = HandlerService(db, blobs, events, configured_handlers)
        monitor = Monitor(db)
        lifecycle_metrics = metrics.LifecycleMetrics(db, events, app_metrics)
        hooks = Webhooks(db, events, settings, app_metrics)
        app.state.context = Context(settings, db, blobs, scheduler, events, CommittedResults(db, blobs),
                                    MarkIndex(db, blobs), result_handlers, monitor,
                                    metrics.LiveCollector(monitor, scheduler, settings, app_metrics), hooks)
        app.state.started_at = int(time.time())
        await result_handlers.start()  # first: its cursor is placed before the scheduler ends any batch
        app.state.loop = asyncio.get_running_loop()
        # So are these readers': the batches that recovery finishes are announced too.
        await lifecycle_metrics.start()
        await hooks.start()
        await metrics.count_resumed(db, app_metrics)
        if settings.preload:
            await scheduler.preload()
        await scheduler.start()
        monitor.start()
        served = "the models its backends serve" if settings.engine == "http" else ", ".join(settings.models)
        log.info("serving %s with the %s engine; data in %s", served, settings.engine, settings.data_dir)
        if allowed_names(settings.host, settings.allowed_hosts) is None and not settings.allowed_hosts:
            log.warning("listening on all interfaces (%s) without --allowed-host: any Host header is served; name "
                        "the hosts this server is reached by with --allowed-host (docs/deployment.md)", settings.host)
        try:
            yield
        finally:
            app.state.context.closing.set()
            await scheduler.stop()
            await result_handlers.stop()
            await monitor.stop()
            await hooks.stop()
            await lifecycle_metrics.stop()
            await db.close()

    # Outermost: the body deadline must see every handler's reads and be able to replace its answer.
    middleware = [Middleware(BodyIdleTimeout, seconds=settings.body_idle_timeout),
                  # Before the key: a web page's request is refused whether or not it could know the key.
                  Middleware(WebGuard, bind_host=settings.host, allowed_hosts=settings.allowed_hosts)]
    if settings.api_key:
        open_paths = ("/metrics",) if settings.metrics_public else ()
        middleware.append(Middleware(BearerAuth, api_key=settings.api_key, open_paths=open_paths))
    app = Starlette(
        routes=[*files.routes, *retry.routes, *batches.routes, *results.routes, *marks.routes,
                *handlers.routes, *webhook_routes.routes, *models.routes, *online.routes, *events.routes,
                *operations.routes, *openapi.routes, *ui.routes],
        middleware=middleware,
        exception_handlers={
            APIError: on_api_error,
            HTTPException: on_http_exception,
            # Before the catch-all: a full disk is answered 507 (see api/errors.py), not 500.
            OSError: on_storage_error,
            sqlite3.Error: on_storage_error,
            MemoryError: on_storage_error,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    # Starlette would answer `/v1/files/file-x/` with a 307 to the path without the slash, and an empty body.
    # No OpenAI route ends in a slash and the SDK never sends one: an unknown path is a 404 in the API's shape.
    app.router.redirect_slashes = False
    return app


def begin_shutdown(app: Starlette) -> None:
    """The server was asked to stop: end the long-lived responses (event streams) now, not at the graceful
    shutdown's timeout. Called from a signal handler, so it only schedules the work on the loop."""
    ctx: Context | None = getattr(app.state, "context", None)
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if ctx is not None and loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(ctx.closing.set)
