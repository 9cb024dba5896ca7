"""What comes after a batch is submitted, without I/O: following its results as they are committed, retrying
only the failed requests, the merged view of a batch and its retries, curation marks, and exports.

These are flows like the core's (see _core.py): generators that yield operations (`_ops.py`) and receive their
results, run by the one driver of each shell. The vllm-batch server's extensions to the Batch API
(docs/results.md) are operations like the Batch API's own (`ReadResults`, `RetryBatches`, `PutMark`, ...), and
every HTTP operation goes through `BatchCore.call`, so all are retried, and their retries logged, alike.
`follow()` hands results to its caller as they come: `Follower.next_page()` is a flow that returns one page,
and the shell's iterator asks for the next one once the caller has taken it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from openai.types import Batch

from vllm_batch._core import BatchCore
from vllm_batch._curation import Mark, Selection
from vllm_batch._errors import BatchStateError, BatchTimeoutError, NotFoundError, VLLMBatchError
from vllm_batch._export import write_export
from vllm_batch._journal import Shard
from vllm_batch._labelstudio import read_annotations
from vllm_batch._ops import (
    DeleteMark,
    Flow,
    ListBatches,
    ListMarks,
    Local,
    PutMark,
    ReadResults,
    RetryBatches,
    Sleep,
)
from vllm_batch._requests import dumps, open_index
from vllm_batch._results import BatchResult, parse_result_line
from vllm_batch._status import TERMINAL, PollSchedule

RETRY_OF = "retry_of"
MAX_RETRY_BATCHES = 16
FIND_RETRIES_MAX_PAGES = 50
# The server's codes for "no such object"; any other 404 means the server lacks the route itself.
OUR_NOT_FOUND = {"batch_not_found", "custom_id_not_found", "mark_not_found", "file_not_found"}


class UnsupportedError(VLLMBatchError):
    """The backend does not offer this vllm-batch server extension (e.g. OpenAI has no marks)."""


def extension(what: str, exc: NotFoundError) -> VLLMBatchError:
    """A 404 for an extension route: our server's "no such object", or a backend without the route."""
    if exc.code in OUR_NOT_FOUND:
        return exc
    return UnsupportedError(f"this backend does not offer {what} (an extension of the vllm-batch server): {exc}")


def _shard_ids(core: BatchCore) -> list[str]:
    core._require_submitted()
    return [s.batch_id for s in core.shards if s.batch_id]


# ---- following results as they are committed ---------------------------------------------------------------


class RequestLookup:
    """custom_id → (input index, request line) over the request lines of a batch, in a scratch SQLite file."""

    def __init__(self, path: Path) -> None:
        self.db = open_index(path)
        self.db.execute("DROP TABLE IF EXISTS lookup")
        self.db.execute("CREATE TABLE lookup (custom_id TEXT PRIMARY KEY, idx INTEGER, line BLOB) WITHOUT ROWID")

    def fill(self, lines: Iterable[bytes]) -> None:
        rows = []
        for index, raw in enumerate(line for line in lines if line.strip()):
            rows.append((json.loads(raw)["custom_id"], index, raw))
            if len(rows) >= 5000:
                self.db.executemany("INSERT OR IGNORE INTO lookup VALUES (?, ?, ?)", rows)
                rows.clear()
        self.db.executemany("INSERT OR IGNORE INTO lookup VALUES (?, ?, ?)", rows)
        self.db.commit()

    def get(self, custom_id: str) -> tuple[int, dict[str, Any]] | None:
        row = self.db.execute("SELECT idx, line FROM lookup WHERE custom_id = ?", (custom_id,)).fetchone()
        return (int(row[0]), json.loads(row[1])) if row else None

    def close(self) -> None:
        self.db.close()


def _request_lines_flow(core: BatchCore) -> Flow[list[Path] | None]:
    """The batch's request lines on disk: the spool when this process built it, else the shards' inputs."""
    if core.spool is not None:
        return None
    paths = []
    for shard in sorted(core.shards, key=lambda s: s.number):
        if shard.target != 0:
            continue
        if shard.path is None or not shard.path.exists():
            batch = shard.batch
            assert batch is not None and shard.batch_id is not None
            path = core.workdir / "inputs" / f"shard-{shard.number}.jsonl"
            yield from core._download(batch.input_file_id, path)
            shard.path = path
        paths.append(shard.path)
    return paths


def _read_lines(core: BatchCore, paths: list[Path] | None) -> Iterator[bytes]:
    if paths is None:
        assert core.spool is not None
        yield from core.spool.lines()
        return
    for path in paths:
        with open(path, "rb") as fh:
            yield from fh


class Follower:
    """Each result once it is committed on the server, shard by shard, output and errors, until every shard has
    ended and been read to its end: BatchResult objects in commit order, a page at a time.

    `start()` is run once, then `next_page()` until it returns None; `close()` in any case. Between the pages
    the follower keeps where each file was read to, so the caller takes each page before the next is asked for
    (and an iterator the caller leaves early asks for nothing more)."""

    def __init__(self, core: BatchCore, *, errors: bool, page_size: int, poll_interval: float,
                 timeout: float | None) -> None:
        self.core = core
        self.page_size = page_size
        self.timeout = timeout
        self.kinds = ("output", "errors") if errors else ("output",)
        self.schedule = PollSchedule(poll_interval, min_interval=0.25)
        self.lookup: RequestLookup | None = None
        self.position: dict[tuple[str | None, str], int] = {}
        self.ended: set[tuple[str | None, str]] = set()
        self.deadline: float | None = None
        # One round reads every file that has not ended, each up to a short page; `None` before the first.
        self.round: list[tuple[Shard, str]] | None = None
        self.progressed = False

    def start(self) -> Flow[None]:
        core = self.core
        _shard_ids(core)
        if core.shards[0].batch is None:
            yield from core.status()
        paths = yield from _request_lines_flow(core)
        lookup = self.lookup = RequestLookup(core.workdir / "follow.sqlite3")
        yield Local(lambda: lookup.fill(_read_lines(core, paths)))
        self.position = {(shard.batch_id, kind): 0 for shard in core.shards for kind in self.kinds}
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout

    def next_page(self) -> Flow[list[BatchResult] | None]:
        """The next lines committed anywhere, as results; None once everything has been read."""
        core, position, lookup = self.core, self.position, self.lookup
        assert lookup is not None, "start() first"
        while True:
            if not self.round:
                if self.round is not None:  # a whole round is over
                    if len(self.ended) == len(position):
                        return None
                    yield Sleep(self._delay())
                self.round = [(shard, kind) for shard in core.shards for kind in self.kinds
                              if (shard.batch_id, kind) not in self.ended]
                self.progressed = False
            shard, kind = self.round[0]
            assert shard.batch_id is not None
            key = (shard.batch_id, kind)
            try:
                lines, headers = yield from core.call(ReadResults(shard.batch_id, kind, position[key], self.page_size))
            except NotFoundError as exc:
                raise extension("partial results", exc) from exc
            position[key] = int(headers.get("x-next-line", position[key] + len(lines)))
            if len(lines) < self.page_size:  # read to its end for now
                self.round.pop(0)
                if headers.get("x-batch-status") in TERMINAL:
                    self.ended.add(key)
            if lines:
                self.progressed = True
                return [_result(core, shard.batch_id, shard.model, lookup, raw) for raw in lines]

    def _delay(self) -> float:
        delay = self.schedule.next(self.progressed)
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise BatchTimeoutError(self.core.id or "", float(self.timeout or 0))
            delay = min(delay, remaining)
        return delay

    def close(self) -> None:
        if self.lookup is not None:
            self.lookup.close()


def _result(core: BatchCore, batch_id: str | None, model: str | None, lookup: RequestLookup,
            raw: bytes) -> BatchResult:
    line = json.loads(raw)
    response, error, status, request_id = parse_result_line(line)
    custom_id = line.get("custom_id", "")
    found = lookup.get(custom_id)
    index, request_line = found if found is not None else (-1, {})
    body = dict(request_line.get("body") or {})
    if model is not None:  # a comparison shard: the model it ran on
        body["model"] = model
    return BatchResult(index=index, custom_id=custom_id, endpoint=request_line.get("url") or core.endpoint or "",
                       model=body.get("model", ""), request=body, response=response, error=error,
                       status_code=status, batch_id=batch_id, request_id=request_id)


# ---- retrying the failed -------------------------------------------------------------------------------------


def retry_failed(core: BatchCore, *, also: Iterable[str], completion_window: str | None,
                 metadata: Mapping[str, str] | None) -> Flow[Batch]:
    """Create one batch of the requests that failed in this batch (all its shards) and in `also`."""
    if core.compare_models:
        raise BatchStateError("a comparison runs one batch per model; retry each model's batch by its id")
    batch_ids = [*_shard_ids(core), *(b for b in also if b not in _shard_ids(core))]
    if len(batch_ids) > MAX_RETRY_BATCHES:
        raise BatchStateError(f"at most {MAX_RETRY_BATCHES} batches can be retried at once, got {len(batch_ids)}")
    # One key for every attempt of this call: a retried POST returns the batch the first one created.
    op = RetryBatches(tuple(batch_ids), "vllm-batch-retry-" + secrets.token_hex(12), completion_window,
                      dict(metadata) if metadata else None)
    try:
        created = yield from core.call(op)
    except NotFoundError as exc:
        raise extension("retrying failed requests", exc) from exc
    return Batch.model_validate(created)


def find_retries(core: BatchCore) -> Flow[list[Batch]]:
    """The batches that retry this one, and retries of those, oldest first (from `metadata.retry_of`)."""
    originals = set(_shard_ids(core))
    known = set(originals)
    candidates: list[Batch] = []
    after: str | None = None
    for _ in range(FIND_RETRIES_MAX_PAGES):
        page: list[Batch]
        page, has_more = yield from core.call(ListBatches(100, after))
        candidates += [b for b in page if (b.metadata or {}).get(RETRY_OF)]
        originals -= {b.id for b in page}
        # Newest first: once every original was listed, whatever follows is older and cannot retry it.
        if not originals or not has_more or not page:
            break
        after = page[-1].id
    found = []
    for batch in reversed(candidates):  # oldest first, so a retry of a retry finds its parent known
        parents = set((batch.metadata or {}).get(RETRY_OF, "").split(","))
        if parents & known:
            found.append(batch)
            known.add(batch.id)
    return found


class MergedResults:
    """The newest result of each custom_id over a batch's retries: a success over any failure, then the newest.
    Kept in a scratch SQLite file, so memory stays flat however many results there are."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("DROP TABLE IF EXISTS merged")
        self.db.execute("CREATE TABLE merged (custom_id TEXT PRIMARY KEY, ok INTEGER, result BLOB) WITHOUT ROWID")

    def add(self, results: Iterable[BatchResult]) -> None:
        """Results of the next (newer) retry."""
        rows = [(r.custom_id, int(r.ok), pickle.dumps(r)) for r in results]
        self.db.executemany(
            "INSERT INTO merged VALUES (?, ?, ?) ON CONFLICT (custom_id) DO UPDATE SET ok = excluded.ok, "
            "result = excluded.result WHERE excluded.ok = 1 OR merged.ok = 0", rows)
        self.db.commit()

    def best(self, original: BatchResult) -> BatchResult:
        if original.ok:
            row = self.db.execute("SELECT ok, result FROM merged WHERE custom_id = ? AND ok = 1",
                                  (original.custom_id,)).fetchone()
            return original if row is None else self._as(original, row[1])
        row = self.db.execute("SELECT ok, result FROM merged WHERE custom_id = ?", (original.custom_id,)).fetchone()
        return original if row is None else self._as(original, row[1])

    @staticmethod
    def _as(original: BatchResult, blob: bytes) -> BatchResult:
        retried: BatchResult = pickle.loads(blob)  # our own scratch file, written just now
        return dataclasses.replace(original, response=retried.response, error=retried.error,
                                   status_code=retried.status_code, batch_id=retried.batch_id,
                                   request_id=retried.request_id)

    def close(self) -> None:
        self.db.close()


def merged(core: BatchCore, retries: list[str] | None) -> Flow[MergedResults]:
    """Prepare this batch's results and index every retry's: the original, in input order, each request with the
    best result any of them has (see MergedResults.best). Close the answer when done."""
    if core.compare_models:
        raise BatchStateError("merging retries is for a batch of one model; use each model's batch id")
    if retries is None:
        retries = [b.id for b in (yield from find_retries(core))]
    yield from core.prepare_results()
    store = MergedResults(core.workdir / "merged.sqlite3")
    try:
        for batch_id in retries:
            sub = BatchCore(core.resolved, workdir=core.workdir / "retries" / batch_id, retry=core.retry)
            try:
                yield from sub.resume(batch_id)
                yield from sub.prepare_results()

                def add(sub: BatchCore = sub) -> None:
                    store.add(result for group in sub.iter_results() for result in group)

                yield Local(add)
            finally:
                sub.close()
    except BaseException:
        store.close()
        raise
    return store


def iter_merged(core: BatchCore, store: MergedResults) -> Iterator[BatchResult]:
    try:
        for group in core.iter_results():
            for result in group:
                yield store.best(result)
    finally:
        store.close()


# ---- marks ------------------------------------------------------------------------------------------------


def set_mark(core: BatchCore, custom_id: str, *, label: str | None, score: float | None, note: str | None,
             batch_id: str | None) -> Flow[Mark]:
    """PUT a mark on the shard that has `custom_id` (the given batch, else each shard in turn)."""
    candidates = [batch_id] if batch_id else _shard_ids(core)
    last: NotFoundError | None = None
    for candidate in candidates:
        try:
            data = yield from core.call(PutMark(candidate, custom_id, label, score, note))
            return Mark.from_api(data)
        except NotFoundError as exc:
            if exc.code != "custom_id_not_found":
                raise extension("marks", exc) from exc
            last = exc
    assert last is not None
    raise last


def delete_mark(core: BatchCore, custom_id: str, batch_id: str | None) -> Flow[bool]:
    """DELETE the mark on `custom_id`; False when there was none."""
    deleted = False
    for candidate in [batch_id] if batch_id else _shard_ids(core):
        try:
            yield from core.call(DeleteMark(candidate, custom_id))
            deleted = True
        except NotFoundError as exc:
            if exc.code != "mark_not_found":
                raise extension("marks", exc) from exc
    return deleted


def list_marks(core: BatchCore, batch_ids: Iterable[str], label: str | None = None) -> Flow[list[Mark]]:
    """Every mark of these batches, each batch's in input order."""
    marks: list[Mark] = []
    for batch_id in batch_ids:
        after: str | None = None
        while True:
            try:
                page = yield from core.call(ListMarks(batch_id, 10_000, after, label))
            except NotFoundError as exc:
                raise extension("marks", exc) from exc
            marks += [Mark.from_api(m) for m in page["data"]]
            if not page.get("has_more") or not page["data"]:
                break
            after = page["last_id"]
    return marks


def import_label_studio(core: BatchCore, path: str | Path) -> Flow[int]:
    """Set the marks a Label Studio annotation export holds; returns how many. A task names the batch its result
    came from (an export with retries can hold results of several); one that does not is looked for in this
    batch's shards."""
    annotations = yield Local(lambda: list(read_annotations(path)))
    count = 0
    for annotation in annotations:
        mark = annotation.mark
        yield from set_mark(core, mark.custom_id, label=mark.label, score=mark.score, note=mark.note,
                            batch_id=annotation.batch_id)
        count += 1
    return count


# ---- export -----------------------------------------------------------------------------------------------


def export(core: BatchCore, path: str | Path, format: str, selection: Selection, with_retries: bool) -> Flow[int]:
    """Write the selected results (with their marks) to `path` in `format`; returns how many were written."""
    store: MergedResults | None = None
    batch_ids = _shard_ids(core)
    if with_retries:
        retry_batches = yield from find_retries(core)
        batch_ids += [b.id for b in retry_batches]
        store = yield from merged(core, [b.id for b in retry_batches])
    else:
        yield from core.prepare_results()
    marks = yield from list_marks(core, batch_ids)
    by_custom_id: dict[str, list[Mark]] = {}
    for mark in marks:
        by_custom_id.setdefault(mark.custom_id, []).append(mark)

    def mark_of(result: BatchResult) -> Mark | None:
        found = by_custom_id.get(result.custom_id)
        if not found:
            return None
        # The mark on the batch whose answer this is; else the newest on the custom_id in the lineage.
        own = [m for m in found if m.batch_id == result.batch_id]
        return own[0] if own else max(found, key=lambda m: m.updated_at or 0)

    def items() -> Iterator[tuple[BatchResult, Mark | None]]:
        results = iter_merged(core, store) if store is not None else (
            r for group in core.iter_results() for r in group)
        for result in results:
            yield result, mark_of(result)

    count: int = yield Local(functools.partial(write_export, path, format, items(), selection))
    return count


def results_as_lines(results: Iterable[BatchResult]) -> Iterator[bytes]:
    """Results as JSONL, in the order given: custom_id, batch_id, the response (status and body) or error."""
    for r in results:
        error = dataclasses.asdict(r.error) if r.error is not None else None
        response = {"status_code": r.status_code, "body": r.response} if r.response is not None else None
        yield dumps({"custom_id": r.custom_id, "batch_id": r.batch_id, "response": response, "error": error})
