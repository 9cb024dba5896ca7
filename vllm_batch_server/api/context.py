"""What every route needs, built once at start-up and hung on the app's state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request

from vllm_batch_server.handlers.service import HandlerService
from vllm_batch_server.observers.metrics import LiveCollector
from vllm_batch_server.observers.monitor import Monitor
from vllm_batch_server.observers.webhooks import Webhooks
from vllm_batch_server.queue.scheduler import Scheduler
from vllm_batch_server.results.marks import MarkIndex
from vllm_batch_server.results.partial import CommittedResults
from vllm_batch_server.settings import Settings
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import Database
from vllm_batch_server.store.events import EventLog


@dataclass
class Context:
    settings: Settings
    db: Database
    blobs: Blobs
    scheduler: Scheduler
    events: EventLog
    # Results (docs/results.md): committed lines of running batches, marks' custom_id index, result handlers.
    results: CommittedResults
    marks: MarkIndex
    handlers: HandlerService
    monitor: Monitor
    metrics: LiveCollector
    webhooks: Webhooks
    # Set when the server begins to shut down: long-lived responses (event streams) end at once.
    closing: asyncio.Event = field(default_factory=asyncio.Event)


def context(request: Request) -> Context:
    ctx: Context = request.app.state.context
    return ctx
