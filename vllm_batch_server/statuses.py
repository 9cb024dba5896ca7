"""A batch's statuses, which may follow which, and the names of the events that announce them.

A leaf: it imports nothing from the package, so anything (the store, the API, the settings' webhook targets,
the client-facing schemas) may use the rules without reaching into the store. `store/lifecycle.py` is where
a batch is moved by them; `store/database.py` turns `TRANSITIONS` into the trigger that refuses any other move.

    validating ──▶ in_progress ──▶ finalizing ──▶ completed
        │  │           │  │  │
        │  │           │  │  └──────▶ failed / expired   (results so far kept)
        │  └───────────┼──┴─▶ cancelling ──▶ cancelled
        └──▶ failed    └──▶ expired
"""

from __future__ import annotations

from enum import Enum


class BatchStatus(str, Enum):
    """OpenAI's batch statuses, spelled as the API shows them."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


S = BatchStatus

# Which statuses may follow each status. A status that is not a key here is terminal.
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.EXPIRED, S.CANCELLING}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.FAILED, S.EXPIRED, S.CANCELLING}),
    S.FINALIZING: frozenset({S.COMPLETED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
}
ACTIVE = frozenset(TRANSITIONS)
TERMINAL = frozenset(BatchStatus) - ACTIVE

# How a run can end. `outcome` is recorded before finalizing renames anything, so a crash mid-way finishes the
# same ending with the same file ids.
OUTCOMES = frozenset({S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED})

# The column stamped with the time a batch reached each status (a new batch has created_at).
STAMP: dict[BatchStatus, str] = {status: f"{status.value}_at" for status in BatchStatus if status is not S.VALIDATING}

CREATED = "batch.created"


def event_type(status: BatchStatus) -> str:
    return f"batch.{status.value}"


EVENT_TYPES = (CREATED, *(event_type(status) for status in BatchStatus if status is not S.VALIDATING))


def predecessors(status: BatchStatus) -> tuple[BatchStatus, ...]:
    return tuple(source for source, targets in TRANSITIONS.items() if status in targets)


def transition_guard_sql() -> str:
    """A trigger that refuses every change of `batches.status` that TRANSITIONS does not allow."""
    allowed = " OR ".join(
        f"(OLD.status = '{source.value}' AND NEW.status IN ({', '.join(repr(t.value) for t in sorted(targets))}))"
        for source, targets in TRANSITIONS.items())
    return ("DROP TRIGGER IF EXISTS batches_legal_transition; "
            "CREATE TRIGGER batches_legal_transition BEFORE UPDATE OF status ON batches "
            f"WHEN NEW.status != OLD.status AND NOT ({allowed}) "
            "BEGIN SELECT RAISE(ABORT, 'illegal batch status transition'); END")
