"""The requests an engine is computing, by id, so that `abort` and `stop` can end them.

Each request runs as its own task: cancelling it ends the caller's `run` with CancelledError and cancels what
the task was awaiting (vLLM then aborts the request, an HTTP backend sees its connection close, a Ray call is
dropped). Shared by the engines that keep no queue of their own to abort from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

from vllm_batch_server.engines.base import Result


class InFlight:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Result]] = {}
        self._aborted: set[str] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, request_id: str, computing: Coroutine[Any, Any, Result]) -> Result:
        task = asyncio.ensure_future(computing)
        self._tasks[request_id] = task
        try:
            # Cancelling the caller cancels the task as well: `await` on a task passes the cancellation on.
            result = await task
        finally:
            self._tasks.pop(request_id, None)
            aborted = request_id in self._aborted
            self._aborted.discard(request_id)
        if aborted:
            # vLLM's serving layer answers a cancelled request with 400 "Client disconnected" instead of raising:
            # that is its reply to our abort, not the request's result. An aborted request ends as the Engine
            # protocol says, with CancelledError.
            raise asyncio.CancelledError
        return result

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            task = self._tasks.get(request_id)
            if task is not None:
                self._aborted.add(request_id)
                task.cancel()

    async def end_all(self) -> None:
        """Cancel every request and wait until each has let go of what it held."""
        self._aborted.update(self._tasks)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
