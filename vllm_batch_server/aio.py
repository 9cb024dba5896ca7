"""Small asyncio helpers shared by the scheduler and the event readers."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` passes. Not asyncio.wait_for: before Python 3.12 it swallows a cancel
    that arrives just as the event fires, and the loop waiting here then never stops (a shutdown that hangs)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout)
    finally:
        waiter.cancel()
