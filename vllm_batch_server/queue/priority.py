"""Who goes first on the shared engine: online requests, then batches by how soon they are due.

Priorities follow vLLM's convention (lower runs first; ties go to the earlier arrival), because the vLLM engine
runs with `scheduling_policy="priority"` and takes these numbers as they are. Two bands keep the rule simple:

- online requests: 0 by default; a caller may ask for any value below `BATCH_BASE` (to order its own online
  requests), and can never fall behind batch work;
- batch requests: `BATCH_BASE` plus the batch's completion window in seconds, so a `1h` batch's requests go
  ahead of a `24h` batch's, and batches with the same window share the engine in arrival order.

This module is the one place that maps a batch to its priority; the runner and the scheduler both ask it.
"""

from __future__ import annotations

import re
from typing import Any

ONLINE = 0
BATCH_BASE = 1_000_000

# OpenAI accepts only "24h"; shorter and longer windows are our extension (handy for deadlines and tests).
_WINDOW = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_SECONDS = 30 * 86400


def window_seconds(value: Any) -> int | None:
    """A completion window ("24h", "90m", "30s", "2d") in seconds; None if it is not one we accept."""
    match = _WINDOW.fullmatch(value) if isinstance(value, str) else None
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    return seconds if 0 < seconds <= MAX_WINDOW_SECONDS else None


def batch_priority(completion_window: str) -> int:
    """The engine priority of every request of a batch with this completion window (a stored batch's window
    was validated at creation; anything else counts as the longest window, so it never jumps the queue)."""
    return BATCH_BASE + (window_seconds(completion_window) or MAX_WINDOW_SECONDS)


def online_priority(requested: Any) -> int:
    """The priority of an online request that asked for `requested` (None: the default). Raises ValueError
    naming the accepted range when it is not an integer below the batch band."""
    if requested is None:
        return ONLINE
    if isinstance(requested, bool) or not isinstance(requested, int) or not -(2**62) <= requested < BATCH_BASE:
        raise ValueError(f"'priority' must be an integer below {BATCH_BASE} (lower runs first; online requests "
                         f"default to {ONLINE} and always run ahead of batch work)")
    return requested
