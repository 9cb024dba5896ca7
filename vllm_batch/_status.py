"""Where a (possibly sharded) batch stands: combined status and counts, and how often to ask again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openai.types import Batch

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        return self.completed + self.failed


@dataclass(frozen=True)
class BatchStatus:
    """Where a (possibly sharded) batch stands: the server's batches and their combined status and counts."""

    id: str
    status: str
    request_counts: RequestCounts
    batches: tuple[Batch, ...]

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The server's reasons for failing batches (for example invalid input lines)."""
        out: list[dict[str, Any]] = []
        for batch in self.batches:
            if batch.errors and batch.errors.data:
                out.extend(e.model_dump(exclude_none=True) for e in batch.errors.data)
        return out

    @property
    def output_tokens(self) -> int | None:
        """Tokens generated so far over all shards, where the backend reports `usage` while it runs."""
        counts = [b.usage.output_tokens for b in self.batches if b.usage is not None]
        return sum(counts) if counts else None

    @property
    def batch_ids(self) -> list[str]:
        return [b.id for b in self.batches]

    @property
    def output_file_ids(self) -> list[str]:
        return [b.output_file_id for b in self.batches if b.output_file_id]

    @property
    def error_file_ids(self) -> list[str]:
        return [b.error_file_id for b in self.batches if b.error_file_id]

    @property
    def output_file_id(self) -> str | None:
        ids = self.output_file_ids
        return ids[0] if ids else None

    @property
    def error_file_id(self) -> str | None:
        ids = self.error_file_ids
        return ids[0] if ids else None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.batches[0].metadata or {}) if self.batches else {}


def combine_status(statuses: list[str]) -> str:
    """One status for several shards: terminal only when all are; failures and cancels win over success."""
    if all(s in TERMINAL for s in statuses):
        for outcome in ("failed", "cancelled", "expired"):
            if outcome in statuses:
                return outcome
        return "completed"
    if "cancelling" in statuses:
        return "cancelling"
    if all(s == "validating" for s in statuses):
        return "validating"
    if all(s in TERMINAL or s == "finalizing" for s in statuses):
        return "finalizing"
    return "in_progress"


class PollSchedule:
    """Adaptive polling: start quick (small batches finish in seconds), back off ×1.5 while nothing changes,
    up to `max_interval`; speed up again when the counts move."""

    def __init__(self, max_interval: float, min_interval: float = 0.5) -> None:
        self.max_interval = max(max_interval, 0.01)
        self.min_interval = min(min_interval, self.max_interval)
        self.delay = self.min_interval

    def next(self, progressed: bool, cap: float | None = None) -> float:
        """The wait before the next poll; `cap` bounds it (and where backing off goes on from) for now."""
        if progressed:
            self.delay = max(self.min_interval, self.delay / 1.5)
        else:
            self.delay = min(self.max_interval, self.delay * 1.5)
        if cap is not None:
            self.delay = max(min(self.delay, cap), self.min_interval)
        return self.delay
