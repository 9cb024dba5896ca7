"""`AsyncVLLMBatch`: the asyncio client. Runs the same flows as `VLLMBatch`, with awaits."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
import httpx
import openai
from openai.types import Batch

from vllm_batch._core import BatchCore, BatchRequests
from vllm_batch._followup_client import AsyncFollowup
from vllm_batch._ops import (
    Cancel,
    CreateBatch,
    Download,
    Extension,
    Flow,
    ListBatches,
    Local,
    Notify,
    Op,
    Retrieve,
    ServerInfo,
    Sleep,
    Upload,
)
from vllm_batch._providers import (
    Provider,
    health_url,
    make_openai_kwargs,
    request_headers,
    resolve_provider,
    with_idempotency_key,
)
from vllm_batch._results import BatchResult, Comparison
from vllm_batch._retry import RetryPolicy, translate
from vllm_batch._status import BatchStatus
from vllm_batch._wire import DEFAULT_TIMEOUT, HEALTH_TIMEOUT, extension_answer, extension_kwargs

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
        self._core = BatchCore(resolved, models=models, workdir=workdir, output_dir=output_dir, retry=retry)
        self._client = openai.AsyncOpenAI(**make_openai_kwargs(resolved, timeout=timeout), http_client=http_client)
        self._headers = request_headers(resolved)

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

    async def _chunks(self, iterator: Iterator[T]) -> AsyncIterator[T]:
        # Reading and decoding results is disk work: do it in a worker thread, a few hundred at a time.
        while True:
            chunk = await anyio.to_thread.run_sync(lambda: list(islice(iterator, 256)))
            if not chunk:
                return
            for item in chunk:
                yield item

    async def list_batches(self, limit: int = 20, after: str | None = None) -> list[Batch]:
        page, _ = await self._run(self._core.call(ListBatches(limit, after)))
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
        """As `VLLMBatch._run`, with awaits. When the task is cancelled the flow is closed, so its clean-up
        (the progress bar, for one) runs then rather than whenever the generator is collected."""
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
        finally:
            flow.close()

    async def _execute(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            await _sleep(op.seconds)
            return None
        if isinstance(op, Local):
            return await anyio.to_thread.run_sync(op.fn)
        if isinstance(op, Notify):
            result = op.fn(op.status)
            return await result if inspect.isawaitable(result) else result
        if isinstance(op, ServerInfo):
            return await self._server_info()
        try:
            return await self._http(op)
        except Exception as exc:
            translated = translate(exc, self._core.provider.base_url)
            if translated is exc:
                raise
            raise translated from exc

    async def _http(self, op: Op) -> Any:
        """One attempt at one HTTP operation (the core decides about retries)."""
        client, headers = self._client, self._headers
        if isinstance(op, Upload):
            with open(op.path, "rb") as fh:  # noqa: ASYNC230 - httpx reads it in chunks as it sends
                created = await client.files.create(
                    file=(op.filename, fh), purpose="batch",
                    extra_headers=with_idempotency_key(headers, op.idempotency_key))
            return created.id
        if isinstance(op, CreateBatch):
            return await client.batches.create(
                input_file_id=op.input_file_id,
                endpoint=cast(Any, op.endpoint),
                completion_window=cast(Any, op.completion_window),
                metadata=op.metadata,
                extra_headers=with_idempotency_key(headers, op.idempotency_key),
            )
        if isinstance(op, Retrieve):
            return await client.batches.retrieve(op.batch_id, extra_headers=headers)
        if isinstance(op, Cancel):
            return await client.batches.cancel(op.batch_id, extra_headers=headers)
        if isinstance(op, ListBatches):
            page = await client.batches.list(limit=op.limit, after=op.after or openai.omit, extra_headers=headers)
            return list(page.data), bool(page.has_more)
        if isinstance(op, Download):
            async with client.files.with_streaming_response.content(op.file_id, extra_headers=headers) as response:
                with open(op.path, "wb") as fh:  # noqa: ASYNC230 - local writes of network-sized chunks
                    async for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
            return None
        if isinstance(op, Extension):
            request = op.request()
            call = getattr(client, request.method.lower())
            return extension_answer(request, await call(request.path, **extension_kwargs(request, headers)))
        raise TypeError(f"unknown operation {op!r}")

    async def _server_info(self) -> Any:
        try:
            return await self._client.get(health_url(self._core.provider.base_url), cast_to=object, options={
                "headers": {**self._headers, "Authorization": openai.Omit()}, "timeout": HEALTH_TIMEOUT})
        except Exception:
            return None
