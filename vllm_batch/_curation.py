"""Curation marks on results (`gold`, `reject`, a score, a note) and the filters an export applies with them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vllm_batch._results import BatchResult


@dataclass(frozen=True)
class Mark:
    """A mark the server stores on one result, keyed by the batch and the request's `custom_id`."""

    custom_id: str
    label: str | None = None
    score: float | None = None
    note: str | None = None
    batch_id: str | None = None
    updated_at: int | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Mark:
        return cls(custom_id=data["custom_id"], label=data.get("label"), score=data.get("score"),
                   note=data.get("note"), batch_id=data.get("batch_id"), updated_at=data.get("updated_at"))


Predicate = Callable[[BatchResult, "Mark | None"], bool]


@dataclass(frozen=True)
class Selection:
    """Which results an export keeps.

    By default every successful result. `labels` keeps only results marked with one of them, `exclude_labels`
    drops those marked with one of them, `min_score` keeps only results marked with at least that score,
    `errors=True` keeps failed results too (only the Label Studio format can show them), and `where(result,
    mark)` is any further test of your own. `limit` stops after that many.
    """

    labels: frozenset[str] | None = None
    exclude_labels: frozenset[str] = frozenset()
    min_score: float | None = None
    errors: bool = False
    where: Predicate | None = None
    limit: int | None = None

    @classmethod
    def of(cls, *, labels: Iterable[str] | str | None = None, exclude_labels: Iterable[str] | str | None = None,
           min_score: float | None = None, errors: bool = False, where: Predicate | None = None,
           limit: int | None = None) -> Selection:
        def names(value: Iterable[str] | str | None) -> frozenset[str] | None:
            if value is None:
                return None
            return frozenset([value] if isinstance(value, str) else value)

        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        return cls(names(labels), names(exclude_labels) or frozenset(), min_score, errors, where, limit)

    def keeps(self, result: BatchResult, mark: Mark | None) -> bool:
        if not result.ok and not self.errors:
            return False
        label = mark.label if mark else None
        if self.labels is not None and label not in self.labels:
            return False
        if label is not None and label in self.exclude_labels:
            return False
        if self.min_score is not None and (mark is None or mark.score is None or mark.score < self.min_score):
            return False
        return self.where is None or bool(self.where(result, mark))
