"""What every route needs, built once at start-up and hung on the app's state."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from vllm_batch_server.scheduler import Scheduler
from vllm_batch_server.settings import Settings
from vllm_batch_server.storage import Storage
from vllm_batch_server.store import Store


@dataclass
class Context:
    settings: Settings
    store: Store
    storage: Storage
    scheduler: Scheduler


def context(request: Request) -> Context:
    ctx: Context = request.app.state.context
    return ctx
