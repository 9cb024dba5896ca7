"""`AsyncVLLMBatch`: the asyncio client. Runs the same flows as `VLLMBatch`, with awaits."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
import httpx
import openai
from openai.types import Batch

from vllm_batch._core import (
    BatchCore,
    BatchRequests,
    BatchStatus,
    Cancel,
    CreateBatch,
    Download,
    Flow,
    ListBatches,
    Local,
    Notify,
    Op,
    Retrieve,
    Sleep,
    Upload,
    find_created,
)
from vllm_batch._followup_client import AsyncFollowup
from vllm_batch._providers import (
    AsyncOpenAIClient,
    Provider,
    make_openai_kwargs,
    resolve_provider,
    scrub_openai_client,
)
from vllm_batch._results import BatchResult, Comparison
from vllm_batch._retry import RetryPolicy, async_retrying, translate
from vllm_batch._sync import DEFAULT_TIMEOUT, _single

T = TypeVar("T")


async def _sleep(seconds: float) -> None:
    # Module-level so tests can replace it and run backoff and polling without waiting.
    await anyio.sleep(seconds)


class AsyncVLLMBatch(BatchRequests, AsyncFollowup):
    """The async twin of `VLLMBatch`: same arguments, same methods, awaited; `results()` and `compare()`
    are async iterators. Adding requests is synchronous (it only writes to a local file).

        async with AsyncVLLMBatch() as batch:
            batch.add_to_batch(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])
            await batch.submit()
            await batch.wait()
            async for result in batch.results():
                ...
    """

    def __init__(
        self,
        *,
        provider: str | Provider | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        models: list[str] | None = None,
        max_requests: int | None = None,
        max_bytes: int | None = None,
        workdir: str | Path | None = None,
        output_dir: str | Path | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        resolved = resolve_provider(
            provider, base_url=base_url, api_key=api_key, max_requests=max_requests, max_bytes=max_bytes
        )
        self._core = BatchCore(resolved, models=models, workdir=workdir, output_dir=output_dir)
        self._retry = retry or RetryPolicy()
        self._client = AsyncOpenAIClient(
            **make_openai_kwargs(resolved, timeout=timeout), http_client=http_client
        )
        scrub_openai_client(self._client, resolved)

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: Any) -> AsyncVLLMBatch:
        batch = cls(**kwargs)
        try:
            batch.add_jsonl(path)
        except BaseException:
            batch._core.close()
            raise
        return batch

    @classmethod
    def from_requests(cls, requests: Iterable[Mapping[str, Any]], **kwargs: Any) -> AsyncVLLMBatch:
        batch = cls(**kwargs)
        try:
            batch.add_requests(requests)
        except BaseException:
            batch._core.close()
            raise
        return batch

    @classmethod
    async def resume(cls, batch_id: str, **kwargs: Any) -> AsyncVLLMBatch:
        batch = cls(**kwargs)
        try:
            await batch._run(batch._core.resume(batch_id))
        except BaseException:
            await batch.aclose()
            raise
        return batch

    # -- lifecycle ----------------------------------------------------------------------------------

    async def submit(self, metadata: Mapping[str, str] | None = None) -> str:
        return await self._run(self._core.submit(metadata))

    async def status(self) -> BatchStatus:
        return await self._run(self._core.status())

    async def wait(
        self,
        poll_interval: float = 60.0,
        timeout: float | None = None,  # noqa: ASYNC109
        callback: Callable[[BatchStatus], Any] | None = None,
        progress: bool = True,
        raise_on_failure: bool = True,
    ) -> BatchStatus:
        return await self._run(
            self._core.wait(
                poll_interval=poll_interval,
                timeout=timeout,
                callback=callback,
                progress=progress,
                raise_on_failure=raise_on_failure,
            )
        )

    async def download(
        self, output_path: str | Path | None = None, error_path: str | Path | None = None
    ) -> tuple[Path | None, Path | None]:
        return await self._run(self._core.download(output_path, error_path))

    async def submit_wait_download(
        self,
        metadata: Mapping[str, str] | None = None,
        *,
        output_path: str | Path | None = None,
        error_path: str | Path | None = None,
        poll_interval: float = 60.0,
        timeout: float | None = None,  # noqa: ASYNC109
        callback: Callable[[BatchStatus], Any] | None = None,
        progress: bool = True,
    ) -> tuple[BatchStatus, Path | None, Path | None]:
        await self.submit(metadata)
        status = await self.wait(
            poll_interval=poll_interval, timeout=timeout, callback=callback, progress=progress
        )
        out, err = await self.download(output_path, error_path)
        return status, out, err

    async def cancel(self) -> BatchStatus:
        return await self._run(self._core.cancel())

    async def results(self) -> AsyncIterator[BatchResult]:
        await self._run(self._core.prepare_results())
        async for group in self._chunks(self._core.iter_results()):
            for result in group:
                yield result

    async def compare(self) -> AsyncIterator[Comparison]:
        await self._run(self._core.prepare_results())
        async for comparison in self._chunks(self._core.iter_comparisons()):
            yield comparison

    async def _chunks(self, iterator: Any) -> AsyncIterator[Any]:
        # Reading and decoding results is disk work: do it in a worker thread, a few hundred at a time.
        while True:
            chunk = await anyio.to_thread.run_sync(lambda: list(islice(iterator, 256)))
            if not chunk:
                return
            for item in chunk:
                yield item

    async def list_batches(self, limit: int = 20, after: str | None = None) -> list[Batch]:
        page, _ = await self._run(_single(ListBatches(limit, after)))
        return cast(list[Batch], page)

    async def aclose(self) -> None:
        self._core.close()
        await self._client.close()

    async def __aenter__(self) -> AsyncVLLMBatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the shell ----------------------------------------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        try:
            op = next(flow)
            while True:
                try:
                    result = await self._execute(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return cast(T, stop.value)

    async def _execute(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            await _sleep(op.seconds)
            return None
        if isinstance(op, Local):
            return await anyio.to_thread.run_sync(op.fn)
        if isinstance(op, Notify):
            result = op.fn(op.status)
            return await result if inspect.isawaitable(result) else result
        try:
            async for attempt in async_retrying(self._retry, _sleep):
                with attempt:
                    return await self._http(op, attempt.retry_state.attempt_number)
        except Exception as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        raise AssertionError("unreachable")

    async def _http(self, op: Op, attempt: int) -> Any:
        client = self._client
        if isinstance(op, Upload):
            with open(op.path, "rb") as fh:  # noqa: ASYNC230 - httpx reads it in chunks as it sends
                created = await client.files.create(file=(op.filename, fh), purpose="batch")
            return created.id
        if isinstance(op, CreateBatch):
            if attempt > 1:
                page = await client.batches.list(limit=100)
                existing = find_created(page.data, op)
                if existing is not None:
                    return existing
            return await client.batches.create(
                input_file_id=op.input_file_id,
                endpoint=cast(Any, op.endpoint),
                completion_window=cast(Any, op.completion_window),
                metadata=op.metadata,
            )
        if isinstance(op, Retrieve):
            return await client.batches.retrieve(op.batch_id)
        if isinstance(op, Cancel):
            return await client.batches.cancel(op.batch_id)
        if isinstance(op, ListBatches):
            page = await client.batches.list(limit=op.limit, after=op.after or openai.omit)
            return list(page.data), bool(page.has_more)
        if isinstance(op, Download):
            tmp = op.path.with_name(op.path.name + ".part")
            async with client.files.with_streaming_response.content(op.file_id) as response:
                with open(tmp, "wb") as fh:  # noqa: ASYNC230 - local writes of network-sized chunks
                    async for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
            os.replace(tmp, op.path)
            return op.path
        raise TypeError(f"unknown operation {op!r}")
