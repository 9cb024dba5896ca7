"""`VLLMBatch`: the blocking client. A thin shell that runs the core's flows with the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import openai
from openai.types import Batch

from vllm_batch._core import BatchCore, BatchRequests
from vllm_batch._followup_client import Followup
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

def _sleep(seconds: float) -> None:
    # Module-level so tests can replace it and run backoff and polling without waiting.
    time.sleep(seconds)


class VLLMBatch(BatchRequests, Followup):
    """Build, submit, follow and collect one batch — sharded over several server batches when it must be.

        with VLLMBatch() as batch:
            batch.add_to_batch(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])
            status, output_path, error_path = batch.submit_wait_download()
            for result in batch.results():
                print(result.custom_id, result.text)

    The backend is `provider=` ("local", "openai", "parasail" or a `Provider`), or `base_url=`, or the
    `BATCH_PROVIDER` / `BATCH_BASE_URL` environment variables, else the local server. `models=[...]` runs
    every request on each model (see `compare()`). `workdir=` keeps the request spool and the submission
    journal somewhere lasting (default: a temporary folder removed on close): run the same requests again
    with the same workdir and `submit()` picks up the batch an earlier, interrupted run created.
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
        http_client: httpx.Client | None = None,
    ) -> None:
        resolved = resolve_provider(
            provider, base_url=base_url, api_key=api_key, max_requests=max_requests, max_bytes=max_bytes
        )
        self._core = BatchCore(resolved, models=models, workdir=workdir, output_dir=output_dir, retry=retry)
        self._client = openai.OpenAI(**make_openai_kwargs(resolved, timeout=timeout), http_client=http_client)
        self._headers = request_headers(resolved)

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: Any) -> VLLMBatch:
        """A batch of the requests in a JSONL file: request lines (`custom_id`, `url`, `body`) or bodies."""
        batch = cls(**kwargs)
        try:
            batch.add_jsonl(path)
        except BaseException:
            batch.close()
            raise
        return batch

    @classmethod
    def from_requests(cls, requests: Iterable[Mapping[str, Any]], **kwargs: Any) -> VLLMBatch:
        """A batch of request bodies (each as for `add_to_batch`, `custom_id`/`endpoint` keys allowed)."""
        batch = cls(**kwargs)
        try:
            batch.add_requests(requests)
        except BaseException:
            batch.close()
            raise
        return batch

    @classmethod
    def resume(cls, batch_id: str, **kwargs: Any) -> VLLMBatch:
        """Pick up a submitted batch by id, from any process: status, wait, download, results, cancel."""
        batch = cls(**kwargs)
        try:
            batch._run(batch._core.resume(batch_id))
        except BaseException:
            batch.close()
            raise
        return batch

    # -- lifecycle ----------------------------------------------------------------------------------

    def submit(self, metadata: Mapping[str, str] | None = None) -> str:
        """Upload and create the batch (several if limits require); returns its id. Calling it again returns
        the same id and creates nothing; after an interrupted submit it finishes the missing shards. A create
        whose answer was lost is found again (Idempotency-Key, then its metadata tags), never made twice."""
        return self._run(self._core.submit(metadata))

    def status(self) -> BatchStatus:
        return self._run(self._core.status())

    def wait(
        self,
        poll_interval: float = 60.0,
        timeout: float | None = None,
        callback: Callable[[BatchStatus], Any] | None = None,
        progress: bool = True,
        raise_on_failure: bool = True,
    ) -> BatchStatus:
        """Poll until the batch ends. Polls start at 0.5 s and back off to `poll_interval` while nothing
        moves. Raises `BatchTimeoutError` after `timeout` seconds and `BatchFailedError` if the server
        failed the batch (unless `raise_on_failure=False`)."""
        return self._run(
            self._core.wait(
                poll_interval=poll_interval,
                timeout=timeout,
                callback=callback,
                progress=progress,
                raise_on_failure=raise_on_failure,
            )
        )

    def download(
        self, output_path: str | Path | None = None, error_path: str | Path | None = None
    ) -> tuple[Path | None, Path | None]:
        """Stream the results to disk (shards merged). A path is None when there is no such file."""
        return self._run(self._core.download(output_path, error_path))

    def submit_wait_download(
        self,
        metadata: Mapping[str, str] | None = None,
        *,
        output_path: str | Path | None = None,
        error_path: str | Path | None = None,
        poll_interval: float = 60.0,
        timeout: float | None = None,
        callback: Callable[[BatchStatus], Any] | None = None,
        progress: bool = True,
    ) -> tuple[BatchStatus, Path | None, Path | None]:
        self.submit(metadata)
        status = self.wait(poll_interval=poll_interval, timeout=timeout, callback=callback, progress=progress)
        out, err = self.download(output_path, error_path)
        return status, out, err

    def cancel(self) -> BatchStatus:
        return self._run(self._core.cancel())

    def results(self) -> Iterator[BatchResult]:
        """Every request with its result, in input order, errors included (see `BatchResult.error`).
        With models=[...], each request's results follow each other in `models` order."""
        self._run(self._core.prepare_results())
        for group in self._core.iter_results():
            yield from group

    def compare(self) -> Iterator[Comparison]:
        """With models=[...]: each request once, with `results[model]` for every model."""
        self._run(self._core.prepare_results())
        yield from self._core.iter_comparisons()

    def list_batches(self, limit: int = 20, after: str | None = None) -> list[Batch]:
        """The most recent batches on this provider, newest first."""
        page, _ = self._run(self._core.call(ListBatches(limit, after)))
        return cast(list[Batch], page)

    def close(self) -> None:
        self._core.close()
        self._client.close()

    def __enter__(self) -> VLLMBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the shell ----------------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        """Perform the flow's operations until it returns. A failure goes back into the flow (as our own
        exception type); if the caller is interrupted, the flow is closed so its clean-up runs."""
        try:
            op = next(flow)
            while True:
                try:
                    result = self._execute(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return cast(T, stop.value)
        finally:
            flow.close()

    def _execute(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            _sleep(op.seconds)
            return None
        if isinstance(op, Local):
            return op.fn()
        if isinstance(op, Notify):
            return op.fn(op.status)
        if isinstance(op, ServerInfo):
            return self._server_info()
        try:
            return self._http(op)
        except Exception as exc:
            translated = translate(exc, self._core.provider.base_url)
            if translated is exc:
                raise
            raise translated from exc

    def _http(self, op: Op) -> Any:
        """One attempt at one HTTP operation (the core decides about retries)."""
        client, headers = self._client, self._headers
        if isinstance(op, Upload):
            # httpx streams the file in chunks, never the whole of it in memory.
            with open(op.path, "rb") as fh:
                return client.files.create(file=(op.filename, fh), purpose="batch",
                                           extra_headers=with_idempotency_key(headers, op.idempotency_key)).id
        if isinstance(op, CreateBatch):
            return client.batches.create(
                input_file_id=op.input_file_id,
                endpoint=cast(Any, op.endpoint),
                completion_window=cast(Any, op.completion_window),
                metadata=op.metadata,
                extra_headers=with_idempotency_key(headers, op.idempotency_key),
            )
        if isinstance(op, Retrieve):
            return client.batches.retrieve(op.batch_id, extra_headers=headers)
        if isinstance(op, Cancel):
            return client.batches.cancel(op.batch_id, extra_headers=headers)
        if isinstance(op, ListBatches):
            page = client.batches.list(limit=op.limit, after=op.after or openai.omit, extra_headers=headers)
            return list(page.data), bool(page.has_more)
        if isinstance(op, Download):
            with client.files.with_streaming_response.content(op.file_id, extra_headers=headers) as response, \
                    open(op.path, "wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
            return None
        if isinstance(op, Extension):
            request = op.request()
            call = getattr(client, request.method.lower())
            return extension_answer(request, call(request.path, **extension_kwargs(request, headers)))
        raise TypeError(f"unknown operation {op!r}")

    def _server_info(self) -> Any:
        # No key: /health is open on a vllm-batch-server, and anything else need not see one.
        try:
            return self._client.get(health_url(self._core.provider.base_url), cast_to=object, options={
                "headers": {**self._headers, "Authorization": openai.Omit()}, "timeout": HEALTH_TIMEOUT})
        except Exception:
            return None
