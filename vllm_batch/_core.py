"""The client's brain, shared by `VLLMBatch` and `AsyncVLLMBatch`, without any network I/O.

Every operation (submit, status, wait, cancel, download, resume, results) is a generator — a *flow* — that
yields small operation objects (`Upload`, `CreateBatch`, `Retrieve`, `Sleep`, ...) and receives their
results. The sync client runs a flow with blocking calls, the async client with awaits; the logic exists
once. Local disk work that can be large (splitting into shards, concatenating downloads, indexing results)
is yielded as `Local` so the async client can move it off the event loop.
"""

from __future__ import annotations

import functools
import json
import secrets
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from openai.types import Batch

from vllm_batch._errors import (
    BatchFailedError,
    BatchStateError,
    BatchTimeoutError,
    BatchValidationError,
    ConflictError,
    VLLMBatchError,
)
from vllm_batch._providers import Provider, ResolvedProvider
from vllm_batch._requests import RequestSpool, dumps, open_index
from vllm_batch._results import BatchResult, Comparison, ResultIndex

T = TypeVar("T")
Flow = Generator["Op", Any, T]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Metadata keys that tie the shards of one logical batch together on the server, so that `resume` works
# from any process with nothing but a batch id.
META_GROUP = "vllm_batch_group"
META_SHARD = "vllm_batch_shard"  # "k/n": this is shard k of n (over all models)
META_TARGET = "vllm_batch_target"  # index of the model in a comparison, "0" otherwise
META_MODEL = "vllm_batch_model"  # the model of a comparison shard
MAX_USER_METADATA = 16 - 4  # OpenAI allows 16 pairs; these are ours
RESUME_MAX_PAGES = 50


# -- operations a flow asks its shell to perform ------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    path: Path
    filename: str


@dataclass(frozen=True)
class CreateBatch:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class Retrieve:
    batch_id: str


@dataclass(frozen=True)
class Cancel:
    batch_id: str


@dataclass(frozen=True)
class ListBatches:
    limit: int
    after: str | None = None


@dataclass(frozen=True)
class Download:
    file_id: str
    path: Path


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Local:
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Notify:
    """Call the user's callback (the async shell awaits it if it is a coroutine function)."""

    fn: Callable[[BatchStatus], Any]
    status: BatchStatus


Op = Upload | CreateBatch | Retrieve | Cancel | ListBatches | Download | Sleep | Local | Notify


def find_created(batches: Iterable[Batch], op: CreateBatch) -> Batch | None:
    """A batch an earlier, seemingly failed attempt of `op` did create (same group and shard metadata)."""
    for batch in batches:
        md = batch.metadata or {}
        if md.get(META_GROUP) == op.metadata.get(META_GROUP) and md.get(META_SHARD) == op.metadata.get(
            META_SHARD
        ):
            return batch
    return None


# -- status -------------------------------------------------------------------------------------------


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

    def next(self, progressed: bool) -> float:
        if progressed:
            self.delay = max(self.min_interval, self.delay / 1.5)
        else:
            self.delay = min(self.max_interval, self.delay * 1.5)
        return self.delay


class _Progress:
    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled = enabled
        self.desc = desc
        self.bar: Any = None

    def update(self, status: BatchStatus) -> None:
        if not self.enabled:
            return
        counts = status.request_counts
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=counts.total or None, desc=self.desc, unit="req", dynamic_ncols=True)
        if counts.total and self.bar.total != counts.total:
            self.bar.total = counts.total
        self.bar.n = counts.done
        self.bar.set_postfix_str(f"{status.status}, failed={counts.failed}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the core -----------------------------------------------------------------------------------------


@dataclass
class Shard:
    """One server batch: a slice of the requests, for one model (target) of a comparison."""

    number: int
    target: int
    model: str | None
    count: int
    path: Path | None = None
    file_id: str | None = None
    batch_id: str | None = None
    batch: Batch | None = None
    downloads: dict[str, Path] = field(default_factory=dict)


class BatchCore:
    def __init__(
        self,
        resolved: ResolvedProvider,
        *,
        models: list[str] | None = None,
        workdir: str | Path | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        self.resolved = resolved
        self.provider = resolved.provider
        if models is not None:
            models = list(models)
            if (
                not models
                or len(set(models)) != len(models)
                or not all(isinstance(m, str) and m for m in models)
            ):
                raise BatchValidationError("models must be distinct, non-empty model names", field="models")
        self.compare_models = models
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vllm-batch-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A client dropped without close() still removes its scratch files (spool, index, downloads).
        self._cleanup = (weakref.finalize(self, shutil.rmtree, self.workdir, True) if self._own_workdir
                         else None)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.spool: RequestSpool | None = None
        self.shards: list[Shard] = []
        self.group = secrets.token_hex(8)
        self.endpoint: str | None = None
        self._results: ResultIndex | None = None
        self._missing: dict[int, str] = {}
        self._db: Any = None

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
            spool.add_line(request)
            n += 1
        return n

    def add_jsonl(self, path: str | Path) -> int:
        def lines() -> Iterator[Mapping[str, Any]]:
            with open(path, "rb") as fh:
                for number, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise BatchValidationError(f"{path}:{number}: not JSON ({exc.msg})") from None
                    if not isinstance(obj, dict):
                        raise BatchValidationError(f"{path}:{number}: expected a JSON object")
                    yield obj

        return self.add_many(lines())

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
            raise BatchStateError("the batch has not been submitted yet; call submit() first")
        return self.id

    # -- submit -------------------------------------------------------------------------------------

    def submit(self, metadata: Mapping[str, str] | None = None) -> Flow[str]:
        if self.submitted:
            # Idempotent: a second call returns the same batch and creates nothing.
            return self._require_submitted()
        user_md = dict(metadata or {})
        if len(user_md) > MAX_USER_METADATA:
            raise BatchValidationError(f"at most {MAX_USER_METADATA} metadata pairs", field="metadata")
        if any(k.startswith("vllm_batch_") for k in user_md):
            raise BatchValidationError(
                "metadata keys starting with vllm_batch_ are reserved", field="metadata"
            )
        if not self.shards:
            spool = self.spool
            if spool is None or spool.stats.count == 0:
                raise BatchStateError("no requests to submit; add_to_batch() first")
            spool.freeze()
            self.endpoint = spool.endpoint
            self.shards = yield Local(self._plan)
        total = len(self.shards)
        for shard in self.shards:
            if shard.batch_id:
                continue  # created by an earlier, interrupted submit()
            if shard.file_id is None:
                assert shard.path is not None
                shard.file_id = yield Upload(shard.path, f"{self.group}-{shard.number}.jsonl")
            md = {
                **user_md,
                META_GROUP: self.group,
                META_SHARD: f"{shard.number}/{total}",
                META_TARGET: str(shard.target),
            }
            if shard.model is not None:
                md[META_MODEL] = shard.model
            assert self.endpoint is not None
            batch = yield CreateBatch(shard.file_id, self.endpoint, self.provider.completion_window, md)
            shard.batch_id, shard.batch = batch.id, batch
        return self._require_submitted()

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
                shard.batch = yield Retrieve(shard.batch_id)
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
        deadline = None if timeout is None else time.monotonic() + timeout
        schedule = PollSchedule(poll_interval)
        bar = _Progress(progress, batch_id)
        previous: tuple[str, int] | None = None
        try:
            while True:
                status = yield from self.status()
                bar.update(status)
                if callback is not None:
                    yield Notify(callback, status)
                if status.done:
                    break
                now = (status.status, status.request_counts.done)
                delay = schedule.next(progressed=previous is not None and now != previous)
                previous = now
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BatchTimeoutError(batch_id, float(timeout or 0), status)
                    delay = min(delay, remaining)
                yield Sleep(delay)
        finally:
            bar.close()
        if raise_on_failure and status.status == "failed":
            raise BatchFailedError(batch_id, status.errors, status)
        return status

    def cancel(self) -> Flow[BatchStatus]:
        self._require_submitted()
        for shard in self.shards:
            if shard.batch is not None and shard.batch.status in TERMINAL:
                continue
            assert shard.batch_id is not None
            try:
                shard.batch = yield Cancel(shard.batch_id)
            except ConflictError:
                # It finished between our last look and the cancel: nothing to cancel, just refresh.
                shard.batch = yield Retrieve(shard.batch_id)
        return self.snapshot()

    # -- download and results -----------------------------------------------------------------------

    def _finished(self) -> Flow[BatchStatus]:
        status = yield from self.status()
        if not status.done:
            raise BatchStateError(f"batch {status.id} is {status.status}; wait() for it to finish first")
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
            path.parent.mkdir(parents=True, exist_ok=True)
            yield Download(file_id, path)
            shard.downloads[kind] = path

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
                    path.parent.mkdir(parents=True, exist_ok=True)
                    yield Download(shard.batch.input_file_id, path)
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
        head: Batch = yield Retrieve(batch_id)
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
            page, has_more = yield ListBatches(100, after)
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
        return self._core.add_many(requests)

    def add_jsonl(self, path: str | Path) -> int:
        return self._core.add_jsonl(path)

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
