"""The ASGI application: routes, error handlers, optional auth, and a lifespan that runs the scheduler."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from vllm_batch_server.api import batches, files, models, online, openapi
from vllm_batch_server.api.auth import BearerAuth
from vllm_batch_server.api.context import Context
from vllm_batch_server.api.errors import (
    APIError,
    on_api_error,
    on_http_exception,
    on_storage_error,
    on_unexpected,
)
from vllm_batch_server.blobs import Blobs
from vllm_batch_server.database import Database
from vllm_batch_server.engines import create_engine
from vllm_batch_server.events import EventLog
from vllm_batch_server.lifecycle import Lifecycle
from vllm_batch_server.scheduler import Scheduler
from vllm_batch_server.settings import Settings

log = logging.getLogger("vllm_batch_server")


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        blobs = Blobs(settings.data_dir)
        blobs.prepare()
        db = await Database.open(settings.db_path)
        lifecycle = Lifecycle(db)
        scheduler = Scheduler(db, blobs, create_engine(settings), settings, lifecycle)
        app.state.context = Context(settings, db, blobs, scheduler, EventLog(db, lifecycle))
        app.state.started_at = int(time.time())
        await scheduler.start()
        log.info("serving %s with the %s engine; data in %s", ", ".join(settings.models), settings.engine,
                 settings.data_dir)
        try:
            yield
        finally:
            await scheduler.stop()
            await db.close()

    middleware = [Middleware(BearerAuth, api_key=settings.api_key)] if settings.api_key else []
    return Starlette(
        routes=[*files.routes, *batches.routes, *models.routes, *online.routes, *openapi.routes],
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
