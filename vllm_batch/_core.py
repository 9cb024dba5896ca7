"""The client's brain, shared by `VLLMBatch` and `AsyncVLLMBatch`, without any network I/O.

Every operation (submit, status, wait, cancel, download, resume, results) is a generator — a *flow* — that
yields small operations (`_ops.py`: `Upload`, `CreateBatch`, `Retrieve`, `Sleep`, ...) and receives their
results. The sync client performs them with blocking calls, the async client with awaits; all behaviour lives
here once: retries and their waits, finding a batch whose create answer was lost, downloads that only appear
under their final name once complete, polling and the progress bar. Local disk work that can be large
(splitting into shards, concatenating downloads, indexing results) is yielded as `Local` so the async
client can move it off the event loop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from openai.types import Batch

from vllm_batch._errors import (
    APIError,
    BatchFailedError,
    BatchStateError,
    BatchTimeoutError,
    BatchValidationError,
    ConflictError,
    VLLMBatchError,
)
from vllm_batch._journal import Journal, Shard
from vllm_batch._ops import (
    Cancel,
    CreateBatch,
    Download,
    Flow,
    HttpOp,
    ListBatches,
    ListModels,
    Local,
    Notify,
    Retrieve,
    ServerInfo,
    Sleep,
    Upload,
)
from vllm_batch._progress import ProgressBar, ProgressMeter
from vllm_batch._providers import Provider, ResolvedProvider, as_batch_server, is_batch_server
from vllm_batch._requests import RequestSpool, dumps, open_index
from vllm_batch._results import BatchResult, Comparison, ResultIndex
from vllm_batch._retry import RetryPolicy
from vllm_batch._status import TERMINAL, BatchStatus, PollSchedule, RequestCounts, combine_status

log = logging.getLogger("vllm_batch")

# Metadata keys that tie the shards of one logical batch together on the server, so that `resume` works
# from any process with nothing but a batch id.
META_GROUP = "vllm_batch_group"
META_SHARD = "vllm_batch_shard"  # "k/n": this is shard k of n (over all models)
META_TARGET = "vllm_batch_target"  # index of the model in a comparison, "0" otherwise
META_MODEL = "vllm_batch_model"  # the model of a comparison shard
MAX_USER_METADATA = 16 - 4  # OpenAI allows 16 pairs; these are ours
RESUME_MAX_PAGES = 50
# Looking for a batch whose create answer was lost: listings go newest first, so stop at batches created well
# before the first attempt (allowing for the server's clock), or after this many pages.
FIND_MAX_PAGES = 20
CLOCK_SKEW = 3600.0
STARTING_POLL_INTERVAL = 2.0  # seconds between polls of a vllm-batch server until a batch's first result


def find_created(batches: Iterable[Batch], op: CreateBatch) -> Batch | None:
    """A batch an earlier, seemingly failed attempt of `op` did create (same group and shard metadata)."""
    for batch in batches:
        md = batch.metadata or {}
        if md.get(META_GROUP) == op.metadata.get(META_GROUP) and md.get(META_SHARD) == op.metadata.get(
            META_SHARD
        ):
            return batch
    return None


def _describe(op: HttpOp) -> str:
    return type(op).__name__.lower()


class BatchCore:
    def __init__(
        self,
        resolved: ResolvedProvider,
        *,
        models: list[str] | None = None,
        workdir: str | Path | None = None,
        output_dir: str | Path | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.resolved = resolved
        if models is not None:
            models = list(models)
            if (
                not models
                or len(set(models)) != len(models)
                or not all(isinstance(m, str) and m for m in models)
            ):
                raise BatchValidationError("models must be distinct, non-empty model names", field="models")
        self.compare_models = models
        self.retry = retry or RetryPolicy()
        self.clock: Callable[[], float] = time.monotonic  # tests may replace it
        self._served: list[str] | None = None  # the models the server lists, once wait() needed them
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vllm-batch-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A client dropped without close() still removes its scratch files (spool, index, downloads).
        self._cleanup = (weakref.finalize(self, shutil.rmtree, self.workdir, True) if self._own_workdir
                         else None)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.journal = Journal(self.workdir)
        self.spool: RequestSpool | None = None
        self.shards: list[Shard] = []
        self.group = secrets.token_hex(8)
        self.endpoint: str | None = None
        self._metadata: dict[str, str] = {}
        self._fingerprint = ""
        # Only a custom URL can turn out to be a vllm-batch-server; the presets are known.
        self._identified = resolved.provider.name != "custom"
        self._results: ResultIndex | None = None
        self._missing: dict[int, str] = {}
        self._db: Any = None

    @property
    def provider(self) -> Provider:
        return self.resolved.provider

    # -- one HTTP operation, retried ----------------------------------------------------------------

    def call(self, op: HttpOp) -> Flow[Any]:
        """Perform `op`, retrying what a later attempt can fix (connection errors, timeouts, 429, 5xx)."""
        attempt = 1
        while True:
            try:
                return (yield op)
            except APIError as exc:
                delay = self.retry.delay(attempt, exc)
                if delay is None:
                    raise
                self._log_retry(op, exc, delay, attempt)
            yield Sleep(delay)
            attempt += 1

    def _log_retry(self, op: HttpOp, exc: APIError, delay: float, attempt: int) -> None:
        log.warning("%s failed: %s; retrying in %.1f s (attempt %d of %d)",
                    _describe(op), exc, delay, attempt + 1, self.retry.max_attempts)

    def identify(self) -> Flow[None]:
        """Recognise a vllm-batch-server behind a custom URL (one look at its `/health`): its own limits then
        apply, and `wait()` can tell when it is loading a model."""
        if self._identified:
            return
        self._identified = True
        if is_batch_server((yield ServerInfo())):
            self.resolved = as_batch_server(self.resolved)

    # -- adding requests ----------------------------------------------------------------------------

    def _spool(self) -> RequestSpool:
        if self.shards:
            raise BatchStateError(
                "this batch was already submitted (or resumed); start a new one to add requests"
            )
        if self.spool is None:
            self.spool = RequestSpool(self.workdir, self.provider, compare_models=self.compare_models)
        return self.spool

    def add(self, request: Mapping[str, Any], *, custom_id: str | None, endpoint: str | None) -> str:
        return self._spool().add(request, custom_id=custom_id, endpoint=endpoint)

    def add_many(self, requests: Iterable[Mapping[str, Any]]) -> int:
        spool = self._spool()
        n = 0
        for request in requests:
            if not isinstance(request, Mapping):
                raise BatchValidationError(
                    f"expected a request as a mapping, got {type(request).__name__}", index=spool.stats.count
                )
            spool.add_line(request)
            n += 1
        return n

    def add_jsonl(self, source: str | Path | IO[bytes]) -> int:
        """Request lines or bare bodies from a JSONL file (or an open binary stream, such as stdin)."""
        spool = self._spool()
        name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<stream>")
        fh: IO[bytes] = open(source, "rb") if isinstance(source, (str, Path)) else source  # noqa: SIM115
        n = 0
        try:
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as exc:
                    reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                    raise BatchValidationError(f"not JSON ({reason})", line=number, source=name) from None
                if not isinstance(obj, dict):
                    raise BatchValidationError("expected a JSON object", line=number, source=name)
                try:
                    spool.add_line(obj, line=number)
                except BatchValidationError as exc:
                    raise exc.at_line(exc.line or number, source=name) from None
                n += 1
        finally:
            if fh is not source:
                fh.close()
        return n

    def __len__(self) -> int:
        if self.spool is not None:
            return self.spool.stats.count
        return sum(s.count for s in self.shards if s.target == 0)

    # -- identity -----------------------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        """The id of the first shard's server batch: what `resume()` and the CLI take."""
        return self.shards[0].batch_id if self.shards else None

    @property
    def submitted(self) -> bool:
        return bool(self.shards) and all(s.batch_id for s in self.shards)

    def _require_submitted(self) -> str:
        if not self.submitted or self.id is None:
            raise BatchStateError("the batch has not been submitted yet")
        return self.id

    # -- submit -------------------------------------------------------------------------------------

    def submit(self, metadata: Mapping[str, str] | None = None) -> Flow[str]:
        if self.submitted:
            # Idempotent: a second call returns the same batch and creates nothing.
            return self._require_submitted()
        if not self.shards:
            user_md = dict(metadata or {})
            if len(user_md) > MAX_USER_METADATA:
                raise BatchValidationError(f"at most {MAX_USER_METADATA} metadata pairs", field="metadata")
            if any(not isinstance(k, str) or not isinstance(v, str) for k, v in user_md.items()):
                raise BatchValidationError("metadata keys and values must be strings", field="metadata")
            if any(k.startswith("vllm_batch_") for k in user_md):
                raise BatchValidationError(
                    "metadata keys starting with vllm_batch_ are reserved", field="metadata"
                )
            spool = self.spool
            if spool is None or spool.stats.count == 0:
                raise BatchStateError("no requests to submit: add some first")
            yield from self.identify()
            spool.freeze()
            self.endpoint = spool.endpoint
            self._metadata = user_md
            self._fingerprint = self._fingerprint_of(spool)
            shards: list[Shard] = yield Local(self._plan)
            self._recall(shards)
            self.shards = shards
            self._save_journal()
        # A later call after an interrupted submit() carries on with the first call's metadata: every shard of
        # one batch is tagged alike, and a repeated create must send the same body with the same key.
        total = len(self.shards)
        for shard in self.shards:
            if shard.batch_id:
                continue  # created by an earlier, interrupted submit()
            if shard.file_id is None:
                assert shard.path is not None
                shard.file_id = yield from self.call(
                    Upload(shard.path, f"{self.group}-{shard.number}.jsonl", shard.upload_key)
                )
                self._save_journal()
            md = {
                **self._metadata,
                META_GROUP: self.group,
                META_SHARD: f"{shard.number}/{total}",
                META_TARGET: str(shard.target),
            }
            if shard.model is not None:
                md[META_MODEL] = shard.model
            batch = yield from self._create(shard, md)
            shard.batch_id, shard.batch = batch.id, batch
            self._save_journal()
        return self._require_submitted()

    def _fingerprint_of(self, spool: RequestSpool) -> str:
        """What makes two submissions the same one (see `_journal.py`)."""
        facts = [spool.digest.hexdigest(), spool.endpoint, self.compare_models, self.provider.base_url,
                 self.provider.max_requests, self.provider.max_bytes, self._metadata]
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def _recall(self, shards: list[Shard]) -> None:
        """Carry over what an earlier submission of the same requests in this workdir already did."""
        earlier = self.journal.load(self._fingerprint)
        if earlier is None:
            return
        group, previous = earlier
        if [(s.target, s.count) for s in previous] != [(s.target, s.count) for s in shards]:
            return
        self.group = group
        for shard, old in zip(shards, previous, strict=True):
            shard.file_id, shard.batch_id = old.file_id, old.batch_id
            shard.upload_key, shard.create_key = old.upload_key, old.create_key
            shard.create_sent_at = old.create_sent_at

    def _save_journal(self) -> None:
        if self._fingerprint:
            self.journal.save(self._fingerprint, self.group, self.shards)

    def _create(self, shard: Shard, metadata: dict[str, str]) -> Flow[Batch]:
        """Create one shard's batch exactly once, even when an answer is lost.

        Every attempt sends the same `Idempotency-Key`, so a server that honours it answers a repeat with
        the batch it already made. For one that ignores it, once a create has been sent (by this call, an
        earlier call, or an earlier process with this workdir) each further attempt first looks for a batch
        carrying this shard's group and shard tags.
        """
        assert shard.file_id is not None and self.endpoint is not None
        op = CreateBatch(shard.file_id, self.endpoint, self.provider.completion_window, metadata,
                         shard.create_key)
        attempt = 1
        while True:
            if shard.create_sent_at is not None:
                found = yield from self._find_created(op, shard.create_sent_at)
                if found is not None:
                    return found
            else:
                shard.create_sent_at = time.time()
                self._save_journal()  # on disk before the request leaves
            try:
                batch: Batch = yield op
                return batch
            except APIError as exc:
                delay = self.retry.delay(attempt, exc)
                if delay is None:
                    raise
                self._log_retry(op, exc, delay, attempt)
            yield Sleep(delay)
            attempt += 1

    def _find_created(self, op: CreateBatch, since: float) -> Flow[Batch | None]:
        after: str | None = None
        for _ in range(FIND_MAX_PAGES):
            page: list[Batch]
            page, has_more = yield from self.call(ListBatches(100, after))
            found = find_created(page, op)
            if found is not None or not has_more or not page:
                return found
            if min(b.created_at for b in page) < since - CLOCK_SKEW:
                return None
            after = page[-1].id
        return None

    def _plan(self) -> list[Shard]:
        """Split the spool into files within the provider's limits, per target model."""
        spool = self.spool
        assert spool is not None
        limit_n, limit_bytes = self.provider.max_requests, self.provider.max_bytes
        targets: list[str | None] = list(self.compare_models) if self.compare_models else [None]
        shards: list[Shard] = []
        for target, model in enumerate(targets):
            # The spool's lines already name the first comparison model; others get theirs written in.
            rewrite = model is not None and model != targets[0]
            if not rewrite and spool.stats.count <= limit_n and spool.stats.bytes <= limit_bytes:
                shards.append(Shard(len(shards), target, model, spool.stats.count, spool.path))
                continue
            out = None
            current: Shard | None = None
            size = 0
            try:
                for raw in spool.lines():
                    line = raw
                    if rewrite:
                        obj = json.loads(raw)
                        obj["body"]["model"] = model
                        line = dumps(obj)
                    if current is None or current.count + 1 > limit_n or size + len(line) > limit_bytes:
                        if out is not None:
                            out.close()
                        path = self.workdir / "shards" / f"shard-{len(shards)}.jsonl"
                        path.parent.mkdir(exist_ok=True)
                        current = Shard(len(shards), target, model, 0, path)
                        shards.append(current)
                        out = open(path, "wb")  # noqa: SIM115 - closed when the shard is full or in finally
                        size = 0
                    assert out is not None
                    out.write(line)
                    current.count += 1
                    size += len(line)
            finally:
                if out is not None:
                    out.close()
        return shards

    # -- status, wait, cancel -----------------------------------------------------------------------

    def status(self) -> Flow[BatchStatus]:
        self._require_submitted()
        for shard in self.shards:
            if shard.batch is None or shard.batch.status not in TERMINAL:
                assert shard.batch_id is not None
                shard.batch = yield from self.call(Retrieve(shard.batch_id))
        return self.snapshot()

    def snapshot(self) -> BatchStatus:
        batches = tuple(s.batch for s in self.shards if s.batch is not None)
        total = completed = failed = 0
        for shard in self.shards:
            counts = shard.batch.request_counts if shard.batch else None
            # While a shard validates the server may report total 0; the count we uploaded is known.
            total += counts.total if counts and counts.total else shard.count
            completed += counts.completed if counts else 0
            failed += counts.failed if counts else 0
        return BatchStatus(
            id=self._require_submitted(),
            status=combine_status([b.status for b in batches]),
            request_counts=RequestCounts(total, completed, failed),
            batches=batches,
        )

    def wait(
        self,
        *,
        poll_interval: float,
        timeout: float | None,
        callback: Callable[[BatchStatus], Any] | None,
        progress: bool,
        raise_on_failure: bool,
    ) -> Flow[BatchStatus]:
        batch_id = self._require_submitted()
        yield from self.identify()
        deadline = None if timeout is None else self.clock() + timeout
        schedule = PollSchedule(poll_interval)
        self._served = None
        bar = ProgressBar(progress, batch_id)
        meter = ProgressMeter()
        previous: tuple[str, int] | None = None
        try:
            while True:
                status = yield from self.status()
                meter.observe(self.clock(), status.request_counts.done, status.output_tokens)
                hint = (yield from self._server_hint()) if progress else None
                bar.update(status, meter, hint)
                if callback is not None:
                    yield Notify(callback, status)
                if status.done:
                    break
                now = (status.status, status.request_counts.done)
                # A vllm-batch server's first results come seconds after a model load or the batch ahead ends,
                # and a small batch is done seconds later: until they come, look every few seconds (it answers
                # in milliseconds), so the bar shows rates and an ETA instead of jumping from 0 to the end.
                starting = self.provider.name == "local" and status.request_counts.done == 0
                delay = schedule.next(progressed=previous is not None and now != previous,
                                      cap=STARTING_POLL_INTERVAL if starting else None)
                previous = now
                if deadline is not None:
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        raise BatchTimeoutError(batch_id, float(timeout or 0), status)
                    delay = min(delay, remaining)
                yield Sleep(delay)
        finally:
            bar.close()
        if raise_on_failure and status.status == "failed":
            raise self.failure(status)
        return status

    def failure(self, status: BatchStatus) -> BatchFailedError:
        """The error for a failed batch, naming the shard that failed (and its model in a comparison)."""
        failed = [s for s in self.shards if s.batch is not None and s.batch.status == "failed"]
        if not failed:
            return BatchFailedError(status.id, status.errors, status)
        errors: list[dict[str, Any]] = []
        for shard in failed:
            assert shard.batch is not None
            if shard.batch.errors and shard.batch.errors.data:
                errors.extend(e.model_dump(exclude_none=True) for e in shard.batch.errors.data)
        first = failed[0]
        assert first.batch_id is not None
        return BatchFailedError(first.batch_id, errors, status, model=first.model)

    def _server_hint(self) -> Flow[str | None]:
        """Why nothing moves yet, when the backend is a vllm-batch-server that can say: it is loading the
        model, or still running another model's batch."""
        if self.provider.name != "local":
            return None
        waiting = next((s for s in self.shards if s.batch is not None and s.batch.status not in TERMINAL), None)
        if waiting is None or waiting.batch is None:
            return None
        counts = waiting.batch.request_counts
        if counts is not None and counts.completed + counts.failed > 0:
            return None
        model = waiting.batch.model or waiting.model or (self.models[0] if self.models else None)
        health = yield ServerInfo()
        if not is_batch_server(health):
            return None
        loaded = health.get("loaded_model")
        if model is None or loaded == model:
            return None
        if not (yield from self._serves(model)):
            return None  # it will not run here: the server refuses the batch, with its reason
        if loaded is None:
            return f"server is loading {model}"
        return f"server is running {loaded}, {model} is next"

    def _serves(self, model: str) -> Flow[bool]:
        """Whether the server lists `model` in /v1/models (asked once per wait(); True if it cannot say)."""
        if self._served is None:
            try:
                answer = yield ListModels()
                data = answer.get("data") if isinstance(answer, dict) else None
                self._served = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m] \
                    if isinstance(data, list) else []
            except VLLMBatchError:
                self._served = []
        return not self._served or model in self._served

    def cancel(self) -> Flow[BatchStatus]:
        self._require_submitted()
        for shard in self.shards:
            if shard.batch is not None and shard.batch.status in TERMINAL:
                continue
            assert shard.batch_id is not None
            try:
                shard.batch = yield from self.call(Cancel(shard.batch_id))
            except ConflictError:
                # It finished between our last look and the cancel: nothing to cancel, just refresh.
                shard.batch = yield from self.call(Retrieve(shard.batch_id))
        return self.snapshot()

    # -- download and results -----------------------------------------------------------------------

    def _finished(self) -> Flow[BatchStatus]:
        status = yield from self.status()
        if not status.done:
            raise BatchStateError(
                f"batch {status.id} is still {status.status}: its results can be fetched once it has ended"
            )
        return status

    def _default_path(self, kind: str) -> Path:
        base = self.output_dir if self.output_dir is not None else Path.cwd()
        return base / f"{self.id}-{kind}.jsonl"

    def download(
        self, output_path: str | Path | None, error_path: str | Path | None
    ) -> Flow[tuple[Path | None, Path | None]]:
        yield from self._finished()
        wanted = {
            "output": Path(output_path) if output_path else self._default_path("output"),
            "errors": Path(error_path) if error_path else self._default_path("errors"),
        }
        single = len(self.shards) == 1
        for shard in self.shards:
            yield from self._fetch_shard(shard, wanted if single else None)
        result: dict[str, Path | None] = {}
        for kind, dest in wanted.items():
            parts = [s.downloads[kind] for s in self.shards if kind in s.downloads]
            if not parts:
                result[kind] = None
            elif single:
                result[kind] = dest
            else:
                yield Local(functools.partial(_concat, parts, dest))
                result[kind] = dest
        return result["output"], result["errors"]

    def _fetch_shard(self, shard: Shard, dest: Mapping[str, Path] | None) -> Flow[None]:
        batch = shard.batch
        assert batch is not None
        for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
            if not file_id:
                continue
            if dest is None and kind in shard.downloads and shard.downloads[kind].exists():
                continue  # results() reuses what download() already fetched, wherever it was put
            path = dest[kind] if dest else self.workdir / "downloads" / f"{batch.id}-{kind}.jsonl"
            if shard.downloads.get(kind) == path and path.exists():
                continue
            yield from self._download(file_id, path)
            shard.downloads[kind] = path

    def _download(self, file_id: str, path: Path) -> Flow[None]:
        """Stream a file to `path`: it is written as `<path>.part` and takes its name only once complete, so
        a file at `path` is never a truncated one. Missing folders are created."""
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        yield from self.call(Download(file_id, part))
        os.replace(part, path)

    def prepare_results(self) -> Flow[None]:
        """Download whatever results (and, after a resume, inputs) are not on disk yet, then index them."""
        yield from self._finished()
        for shard in self.shards:
            yield from self._fetch_shard(shard, None)
        if self.spool is None:
            for shard in self.shards:
                if shard.target == 0 and (shard.path is None or not shard.path.exists()):
                    assert shard.batch is not None
                    path = self.workdir / "inputs" / f"shard-{shard.number}.jsonl"
                    yield from self._download(shard.batch.input_file_id, path)
                    shard.path = path
        self._missing = {
            target: "; ".join(
                sorted(
                    {
                        f"batch {s.batch_id} ended {s.batch.status}"
                        for s in self.shards
                        if s.target == target and s.batch is not None
                    }
                )
            )
            for target in {s.target for s in self.shards}
        }
        yield Local(self._index_results)

    def _index_results(self) -> None:
        if self._db is None:
            self._db = self.spool.db if self.spool is not None else open_index(self.workdir / "index.sqlite3")
        index = ResultIndex(self._db)
        for shard in self.shards:
            for path in shard.downloads.values():
                index.add_file(path, shard.target, shard.batch_id)
        self._results = index

    def _request_lines(self) -> Iterator[bytes]:
        if self.spool is not None:
            yield from self.spool.lines()
            return
        for shard in sorted(self.shards, key=lambda s: s.number):
            if shard.target == 0 and shard.path is not None:
                with open(shard.path, "rb") as fh:
                    yield from (line for line in fh if line.strip())

    @property
    def models(self) -> list[str]:
        if self.compare_models:
            return self.compare_models
        return list(self.spool.models) if self.spool is not None else []

    def iter_results(self) -> Iterator[list[BatchResult]]:
        if self._results is None:
            raise BatchStateError("results are not ready; call results() on the client")
        return self._results.iterate(
            self._request_lines(), self.models, self.compare_models is not None, self._missing
        )

    def iter_comparisons(self) -> Iterator[Comparison]:
        if not self.compare_models:
            raise BatchStateError("compare() needs a batch created with models=[...]")
        for group in self.iter_results():
            first = group[0]
            request = {k: v for k, v in first.request.items() if k != "model"}
            yield Comparison(first.index, first.custom_id, request, {r.model: r for r in group})

    # -- resume -------------------------------------------------------------------------------------

    def resume(self, batch_id: str) -> Flow[str]:
        yield from self.identify()
        head: Batch = yield from self.call(Retrieve(batch_id))
        md = head.metadata or {}
        group, shard_tag = md.get(META_GROUP), md.get(META_SHARD)
        if not group or not shard_tag or "/" not in shard_tag:
            # A batch this client did not create: one shard, as is.
            self.shards = [
                Shard(0, 0, None, _total(head), batch_id=head.id, batch=head, file_id=head.input_file_id)
            ]
            self.endpoint = head.endpoint
            return head.id
        total = int(shard_tag.split("/")[1])
        found: dict[int, Batch] = {int(shard_tag.split("/")[0]): head}
        after: str | None = None
        for _ in range(RESUME_MAX_PAGES):
            if len(found) >= total:
                break
            page: list[Batch]
            page, has_more = yield from self.call(ListBatches(100, after))
            for batch in page:
                bmd = batch.metadata or {}
                if bmd.get(META_GROUP) == group and "/" in bmd.get(META_SHARD, ""):
                    found.setdefault(int(bmd[META_SHARD].split("/")[0]), batch)
            if not has_more or not page:
                break
            after = page[-1].id
        if len(found) < total:
            raise VLLMBatchError(
                f"batch {batch_id} is one of {total} shards but only {len(found)} were found on the server"
            )
        self.group = group
        shards = []
        models: dict[int, str] = {}
        for number in range(total):
            batch = found[number]
            bmd = batch.metadata or {}
            target = int(bmd.get(META_TARGET, "0"))
            if bmd.get(META_MODEL):
                models[target] = bmd[META_MODEL]
            shards.append(
                Shard(
                    number,
                    target,
                    bmd.get(META_MODEL),
                    _total(batch),
                    batch_id=batch.id,
                    batch=batch,
                    file_id=batch.input_file_id,
                )
            )
        if models:
            self.compare_models = [models[t] for t in sorted(models)]
        self.shards = shards
        self.endpoint = head.endpoint
        return self._require_submitted()

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
        elif self._db is not None:
            self._db.close()
        self._db = None
        if self._cleanup is not None:
            self._cleanup()


def _total(batch: Batch) -> int:
    return batch.request_counts.total if batch.request_counts else 0


def _concat(parts: list[Path], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 20)
    tmp.replace(dest)


class BatchRequests:
    """What the sync and async batches share without any I/O: adding requests and naming the batch."""

    _core: BatchCore

    def add_to_batch(self, *, custom_id: str | None = None, endpoint: str | None = None, **request: Any) -> str:
        """Validate one request and append it; returns its custom_id (generated when not given).

        The endpoint follows from the body (`messages` → chat, `prompt` → completions, `input` →
        embeddings, `query` + `documents` → vLLM's rerank, `queries` + `documents` → vLLM's score) unless
        `endpoint=` says otherwise (`"/v1/responses"` for the Responses API).
        """
        return self._core.add(request, custom_id=custom_id, endpoint=endpoint)

    def add_requests(self, requests: Iterable[Mapping[str, Any]]) -> int:
        """Add request bodies (as for `add_to_batch`; `custom_id`, `endpoint` or `url` keys are taken out of
        the body and used as such). Returns how many were added."""
        return self._core.add_many(requests)

    def add_jsonl(self, source: str | Path | IO[bytes]) -> int:
        """Request lines (`custom_id`, `url`, `body`) or bare bodies from a JSONL file or a binary stream.
        A refused line raises `BatchValidationError` with its `line` (from 1) and `source`."""
        return self._core.add_jsonl(source)

    def __len__(self) -> int:
        return len(self._core)

    @property
    def id(self) -> str | None:
        return self._core.id

    @property
    def batch_ids(self) -> list[str]:
        return [s.batch_id for s in self._core.shards if s.batch_id]

    @property
    def provider(self) -> Provider:
        return self._core.provider

    @property
    def models(self) -> list[str]:
        return self._core.models
