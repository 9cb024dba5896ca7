"""The methods `VLLMBatch` and `AsyncVLLMBatch` gain for what comes after submitting: follow, retry_failed,
retries, merged_results, mark, unmark, marks, export, import_label_studio. They run the flows of _followup.py
with the batch's own client and retry policy; the extension calls (`ApiCall`) are made here, everything else
by the batch's shell."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
import httpx
from openai.types import Batch

from vllm_batch import _followup as f
from vllm_batch._core import BatchCore
from vllm_batch._curation import Mark, Predicate, Selection
from vllm_batch._ops import Op
from vllm_batch._results import BatchResult
from vllm_batch._retry import translate

T = TypeVar("T")


def _mark_body(label: str | None, score: float | None, note: str | None) -> dict[str, Any]:
    return {"label": label, "score": score, "note": note}


def _target(item: str | BatchResult, batch_id: str | None) -> tuple[str, str | None]:
    if isinstance(item, BatchResult):
        return item.custom_id, batch_id or item.batch_id
    return item, batch_id


def _request_kwargs(op: f.ApiCall, headers: Mapping[str, Any]) -> dict[str, Any]:
    # As the SDK's own resources ask: the API key only (the default would add an empty admin key). `headers`
    # are the batch's own per-request headers (what must not ride along to this host, or no key at all).
    options: dict[str, Any] = {"security": {"bearer_auth": True}, "headers": {**headers, **(op.headers or {})}}
    if op.params:
        options["params"] = dict(op.params)
    kwargs: dict[str, Any] = {"cast_to": httpx.Response, "options": options}
    if op.body is not None:
        kwargs["body"] = dict(op.body)
    return kwargs


def _answer(op: f.ApiCall, response: httpx.Response) -> Any:
    if op.lines:
        return response.content.splitlines(keepends=True), dict(response.headers)
    return response.json()


def _selection(labels: Iterable[str] | str | None, exclude_labels: Iterable[str] | str | None,
               min_score: float | None, errors: bool, where: Predicate | None, limit: int | None) -> Selection:
    return Selection.of(labels=labels, exclude_labels=exclude_labels, min_score=min_score, errors=errors,
                        where=where, limit=limit)


class Followup:
    """Mixed into `VLLMBatch`."""

    _core: BatchCore
    _client: Any
    _headers: dict[str, Any]
    _execute: Callable[[Op], Any]

    # -- following a running batch ----------------------------------------------------------------------

    def follow(self, *, errors: bool = True, poll_interval: float = 5.0, timeout: float | None = None,
               page_size: int = 1000) -> Iterator[BatchResult]:
        """Each result as soon as the server has committed it, while the batch runs (commit order, not input
        order; `index` and `request` tell which request it answers), until every result is in. `errors=False`
        skips failed requests. Needs the vllm-batch server (it reads the committed lines of a running batch)."""
        return self._stream(f.follow(self._core, errors=errors, page_size=page_size, poll_interval=poll_interval,
                                     timeout=timeout))

    # -- retrying the failed ------------------------------------------------------------------------------

    def retry_failed(self, *, also: Iterable[str] = (), completion_window: str | None = None,
                     metadata: Mapping[str, str] | None = None) -> Any:
        """A new batch of the requests of this batch (and of the batches in `also`, e.g. earlier retries) that
        have no successful result, under the same custom_ids; its `metadata.retry_of` names the batches it
        retries. Returns it as a new client object (close it too). Needs the vllm-batch server."""
        created = self._run_followup(f.retry_failed(self._core, also=also, completion_window=completion_window,
                                                    metadata=metadata))
        return type(self).resume(created.id, **self._same_backend())  # type: ignore[attr-defined]

    def retries(self) -> list[Batch]:
        """The batches retrying this one (and retries of those), oldest first."""
        return self._run_followup(f.find_retries(self._core))

    def merged_results(self, retries: Iterable[str] | None = None) -> Iterator[BatchResult]:
        """Every request in input order with its best result over this batch and its retries (found on the
        server, or the batch ids given): the newest success, else the newest failure."""
        store = self._run_followup(f.merged(self._core, list(retries) if retries is not None else None))
        return f.iter_merged(self._core, store)

    # -- marks --------------------------------------------------------------------------------------------

    def mark(self, item: str | BatchResult, *, label: str | None = None, score: float | None = None,
             note: str | None = None, batch_id: str | None = None) -> Mark:
        """Mark one result (by custom_id, or a BatchResult) with a label (e.g. "gold", "reject"), a score and/or
        a note; replaces its earlier mark."""
        custom_id, batch_id = _target(item, batch_id)
        return self._run_followup(f.set_mark(self._core, custom_id, _mark_body(label, score, note), batch_id))

    def unmark(self, item: str | BatchResult, *, batch_id: str | None = None) -> bool:
        """Remove a result's mark; False if it had none."""
        custom_id, batch_id = _target(item, batch_id)
        return self._run_followup(f.delete_mark(self._core, custom_id, batch_id))

    def marks(self, label: str | None = None) -> list[Mark]:
        """The marks on this batch's results (one label only, if given), in input order."""
        return self._run_followup(f.list_marks(f._shard_ids(self._core), label))

    def import_label_studio(self, path: str | Path) -> int:
        """Set marks from a Label Studio annotation export (JSON or JSON-MIN); returns how many."""
        return self._run_followup(f.import_label_studio(self._core, path))

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
        return self._run_followup(f.export(self._core, path, format, selection, with_retries))

    # -- the shell ----------------------------------------------------------------------------------------

    def _same_backend(self) -> dict[str, Any]:
        return {"provider": self._core.provider, "api_key": self._core.resolved.api_key, "retry": self._core.retry}

    def _drive(self, flow: f.XFlow[T]) -> Generator[Any, None, T]:
        try:
            op = next(flow)
            while True:
                if isinstance(op, f.Emit):
                    yield from op.items
                    op = flow.send(None)
                    continue
                try:
                    result = self._api(op) if isinstance(op, f.ApiCall) else self._execute(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return cast(T, stop.value)
        finally:
            flow.close()

    def _stream(self, flow: f.XFlow[Any]) -> Iterator[Any]:
        yield from self._drive(flow)

    def _run_followup(self, flow: f.XFlow[T]) -> T:
        driver = self._drive(flow)
        try:
            while True:
                next(driver)
        except StopIteration as stop:
            return cast(T, stop.value)

    def _api(self, op: f.ApiCall) -> Any:
        """One extension call, retried by the same policy and rule as the core's operations."""
        from vllm_batch._sync import _sleep

        call = getattr(self._client, op.method.lower())
        attempt = 1
        while True:
            try:
                return _answer(op, call(op.path, **_request_kwargs(op, self._headers)))
            except Exception as exc:
                translated = translate(exc, self._core.provider.base_url)
                delay = self._core.retry.delay(attempt, translated)
                if delay is None:
                    if translated is exc:
                        raise
                    raise translated from exc
            _sleep(delay)
            attempt += 1


class AsyncFollowup:
    """Mixed into `AsyncVLLMBatch`: the same methods, awaited; `follow()` and `merged_results()` are async
    iterators."""

    _core: BatchCore
    _client: Any
    _headers: dict[str, Any]
    _execute: Callable[[Op], Any]

    async def follow(self, *, errors: bool = True, poll_interval: float = 5.0, timeout: float | None = None,  # noqa: ASYNC109
                     page_size: int = 1000) -> AsyncIterator[BatchResult]:
        async for item in self._stream(f.follow(self._core, errors=errors, page_size=page_size,
                                                 poll_interval=poll_interval, timeout=timeout)):
            yield item

    async def retry_failed(self, *, also: Iterable[str] = (), completion_window: str | None = None,
                           metadata: Mapping[str, str] | None = None) -> Any:
        created = await self._run_followup(f.retry_failed(self._core, also=also, completion_window=completion_window,
                                                          metadata=metadata))
        return await type(self).resume(created.id, **self._same_backend())  # type: ignore[attr-defined]

    async def retries(self) -> list[Batch]:
        return await self._run_followup(f.find_retries(self._core))

    async def merged_results(self, retries: Iterable[str] | None = None) -> AsyncIterator[BatchResult]:
        store = await self._run_followup(f.merged(self._core, list(retries) if retries is not None else None))
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
        return await self._run_followup(f.set_mark(self._core, custom_id, _mark_body(label, score, note), batch_id))

    async def unmark(self, item: str | BatchResult, *, batch_id: str | None = None) -> bool:
        custom_id, batch_id = _target(item, batch_id)
        return await self._run_followup(f.delete_mark(self._core, custom_id, batch_id))

    async def marks(self, label: str | None = None) -> list[Mark]:
        return await self._run_followup(f.list_marks(f._shard_ids(self._core), label))

    async def import_label_studio(self, path: str | Path) -> int:
        return await self._run_followup(f.import_label_studio(self._core, path))

    async def export(self, path: str | Path, format: str = "openai", *, labels: Iterable[str] | str | None = None,
                     exclude_labels: Iterable[str] | str | None = None, min_score: float | None = None,
                     errors: bool = False, where: Predicate | None = None, limit: int | None = None,
                     with_retries: bool = False) -> int:
        selection = _selection(labels, exclude_labels, min_score, errors, where, limit)
        return await self._run_followup(f.export(self._core, path, format, selection, with_retries))

    # -- the shell ----------------------------------------------------------------------------------------

    def _same_backend(self) -> dict[str, Any]:
        return {"provider": self._core.provider, "api_key": self._core.resolved.api_key, "retry": self._core.retry}

    async def _step(self, op: f.FlowOp) -> Any:
        if isinstance(op, f.ApiCall):
            return await self._api(op)
        assert not isinstance(op, f.Emit)
        return await self._execute(op)

    async def _stream(self, flow: f.XFlow[Any]) -> AsyncIterator[Any]:
        try:
            op = next(flow)
            while True:
                if isinstance(op, f.Emit):
                    for item in op.items:
                        yield item
                    op = flow.send(None)
                    continue
                try:
                    result = await self._step(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration:
            return
        finally:
            flow.close()

    async def _run_followup(self, flow: f.XFlow[T]) -> T:
        try:
            op = next(flow)
            while True:
                if isinstance(op, f.Emit):
                    raise AssertionError("this flow emits nothing")
                try:
                    result = await self._step(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return cast(T, stop.value)

    async def _api(self, op: f.ApiCall) -> Any:
        from vllm_batch._async import _sleep

        call = getattr(self._client, op.method.lower())
        attempt = 1
        while True:
            try:
                return _answer(op, await call(op.path, **_request_kwargs(op, self._headers)))
            except Exception as exc:
                translated = translate(exc, self._core.provider.base_url)
                delay = self._core.retry.delay(attempt, translated)
                if delay is None:
                    if translated is exc:
                        raise
                    raise translated from exc
            await _sleep(delay)
            attempt += 1
