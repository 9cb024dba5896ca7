"""The methods `VLLMBatch` and `AsyncVLLMBatch` gain for what comes after submitting: follow, retry_failed,
retries, merged_results, mark, unmark, marks, export, import_label_studio. They run the flows of _followup.py
with the batch's own driver (`_run`), as every other method does; nothing here performs an operation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
from openai.types import Batch

from vllm_batch import _followup as f
from vllm_batch._core import BatchCore
from vllm_batch._curation import Mark, Predicate, Selection
from vllm_batch._results import BatchResult

if TYPE_CHECKING:
    from vllm_batch._ops import Flow

T = TypeVar("T")
S = TypeVar("S", bound="Followup")
A = TypeVar("A", bound="AsyncFollowup")


def _target(item: str | BatchResult, batch_id: str | None) -> tuple[str, str | None]:
    if isinstance(item, BatchResult):
        return item.custom_id, batch_id or item.batch_id
    return item, batch_id


def _selection(labels: Iterable[str] | str | None, exclude_labels: Iterable[str] | str | None,
               min_score: float | None, errors: bool, where: Predicate | None, limit: int | None) -> Selection:
    return Selection.of(labels=labels, exclude_labels=exclude_labels, min_score=min_score, errors=errors,
                        where=where, limit=limit)


def _same_backend(core: BatchCore) -> dict[str, Any]:
    return {"provider": core.provider, "api_key": core.resolved.api_key, "retry": core.retry}


class Followup:
    """Mixed into `VLLMBatch`."""

    _core: BatchCore

    if TYPE_CHECKING:
        def _run(self, flow: Flow[T]) -> T: ...

        @classmethod
        def resume(cls: type[S], batch_id: str, **kwargs: Any) -> S: ...

    # -- following a running batch ----------------------------------------------------------------------

    def follow(self, *, errors: bool = True, poll_interval: float = 5.0, timeout: float | None = None,
               page_size: int = 1000) -> Iterator[BatchResult]:
        """Each result as soon as the server has committed it, while the batch runs (commit order, not input
        order; `index` and `request` tell which request it answers), until every result is in. `errors=False`
        skips failed requests. Needs the vllm-batch server (it reads the committed lines of a running batch)."""
        follower = f.Follower(self._core, errors=errors, page_size=page_size, poll_interval=poll_interval,
                              timeout=timeout)
        try:
            self._run(follower.start())
            while (page := self._run(follower.next_page())) is not None:
                yield from page
        finally:
            follower.close()

    # -- retrying the failed ------------------------------------------------------------------------------

    def retry_failed(self: S, *, also: Iterable[str] = (), completion_window: str | None = None,
                     metadata: Mapping[str, str] | None = None) -> S:
        """A new batch of the requests of this batch (and of the batches in `also`, e.g. earlier retries) that
        have no successful result, under the same custom_ids; its `metadata.retry_of` names the batches it
        retries. Returns it as a new client object (close it too). Needs the vllm-batch server."""
        created = self._run(f.retry_failed(self._core, also=also, completion_window=completion_window,
                                           metadata=metadata))
        return type(self).resume(created.id, **_same_backend(self._core))

    def retries(self) -> list[Batch]:
        """The batches retrying this one (and retries of those), oldest first."""
        return self._run(f.find_retries(self._core))

    def merged_results(self, retries: Iterable[str] | None = None) -> Iterator[BatchResult]:
        """Every request in input order with its best result over this batch and its retries (found on the
        server, or the batch ids given): the newest success, else the newest failure."""
        store = self._run(f.merged(self._core, list(retries) if retries is not None else None))
        return f.iter_merged(self._core, store)

    # -- marks --------------------------------------------------------------------------------------------

    def mark(self, item: str | BatchResult, *, label: str | None = None, score: float | None = None,
             note: str | None = None, batch_id: str | None = None) -> Mark:
        """Mark one result (by custom_id, or a BatchResult) with a label (e.g. "gold", "reject"), a score and/or
        a note; replaces its earlier mark."""
        custom_id, batch_id = _target(item, batch_id)
        return self._run(f.set_mark(self._core, custom_id, label=label, score=score, note=note, batch_id=batch_id))

    def unmark(self, item: str | BatchResult, *, batch_id: str | None = None) -> bool:
        """Remove a result's mark; False if it had none."""
        custom_id, batch_id = _target(item, batch_id)
        return self._run(f.delete_mark(self._core, custom_id, batch_id))

    def marks(self, label: str | None = None) -> list[Mark]:
        """The marks on this batch's results (one label only, if given), in input order."""
        return self._run(f.list_marks(self._core, f._shard_ids(self._core), label))

    def import_label_studio(self, path: str | Path) -> int:
        """Set marks from a Label Studio annotation export (JSON or JSON-MIN); returns how many."""
        return self._run(f.import_label_studio(self._core, path))

    # -- export -------------------------------------------------------------------------------------------

    def export(self, path: str | Path, format: str = "openai", *, labels: Iterable[str] | str | None = None,
               exclude_labels: Iterable[str] | str | None = None, min_score: float | None = None,
               errors: bool = False, where: Predicate | None = None, limit: int | None = None,
               with_retries: bool = False) -> int:
        """Write results as training or few-shot data (`openai`, `sharegpt`, `alpaca`, `in-context`) or as Label
        Studio tasks (`label-studio`); returns how many were written. By default every successful result;
        `labels=["gold"]` keeps only results marked so, `exclude_labels`, `min_score`, `where(result, mark)`
        and `limit` narrow it further; `with_retries=True` takes each request's best result over its retries."""
        selection = _selection(labels, exclude_labels, min_score, errors, where, limit)
        return self._run(f.export(self._core, path, format, selection, with_retries))


class AsyncFollowup:
    """Mixed into `AsyncVLLMBatch`: the same methods, awaited; `follow()` and `merged_results()` are async
    iterators."""

    _core: BatchCore

    if TYPE_CHECKING:
        async def _run(self, flow: Flow[T]) -> T: ...

        @classmethod
        async def resume(cls: type[A], batch_id: str, **kwargs: Any) -> A: ...

    async def follow(self, *, errors: bool = True, poll_interval: float = 5.0, timeout: float | None = None,  # noqa: ASYNC109
                     page_size: int = 1000) -> AsyncIterator[BatchResult]:
        follower = f.Follower(self._core, errors=errors, page_size=page_size, poll_interval=poll_interval,
                              timeout=timeout)
        try:
            await self._run(follower.start())
            while (page := await self._run(follower.next_page())) is not None:
                for result in page:
                    yield result
        finally:
            follower.close()

    async def retry_failed(self: A, *, also: Iterable[str] = (), completion_window: str | None = None,
                           metadata: Mapping[str, str] | None = None) -> A:
        created = await self._run(f.retry_failed(self._core, also=also, completion_window=completion_window,
                                                 metadata=metadata))
        return await type(self).resume(created.id, **_same_backend(self._core))

    async def retries(self) -> list[Batch]:
        return await self._run(f.find_retries(self._core))

    async def merged_results(self, retries: Iterable[str] | None = None) -> AsyncIterator[BatchResult]:
        store = await self._run(f.merged(self._core, list(retries) if retries is not None else None))
        iterator = f.iter_merged(self._core, store)
        while True:
            chunk = await anyio.to_thread.run_sync(lambda: [r for _, r in zip(range(256), iterator, strict=False)])
            if not chunk:
                return
            for result in chunk:
                yield result

    async def mark(self, item: str | BatchResult, *, label: str | None = None, score: float | None = None,
                   note: str | None = None, batch_id: str | None = None) -> Mark:
        custom_id, batch_id = _target(item, batch_id)
        return await self._run(f.set_mark(self._core, custom_id, label=label, score=score, note=note,
                                          batch_id=batch_id))

    async def unmark(self, item: str | BatchResult, *, batch_id: str | None = None) -> bool:
        custom_id, batch_id = _target(item, batch_id)
        return await self._run(f.delete_mark(self._core, custom_id, batch_id))

    async def marks(self, label: str | None = None) -> list[Mark]:
        return await self._run(f.list_marks(self._core, f._shard_ids(self._core), label))

    async def import_label_studio(self, path: str | Path) -> int:
        return await self._run(f.import_label_studio(self._core, path))

    async def export(self, path: str | Path, format: str = "openai", *, labels: Iterable[str] | str | None = None,
                     exclude_labels: Iterable[str] | str | None = None, min_score: float | None = None,
                     errors: bool = False, where: Predicate | None = None, limit: int | None = None,
                     with_retries: bool = False) -> int:
        selection = _selection(labels, exclude_labels, min_score, errors, where, limit)
        return await self._run(f.export(self._core, path, format, selection, with_retries))
