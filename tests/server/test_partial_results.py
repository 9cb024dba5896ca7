"""Partial results: GET /v1/batches/{id}/output and /errors return committed lines only, by line number, while
the batch runs and after it ended; a kill -9 never takes back a line a reader was given."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TERMINAL, ServerFactory, chat_lines, read_jsonl, sdk, submit, wait_for
from tests.hostile.errors import assert_openai_error
from vllm_batch_server.results import partial
from vllm_batch_server.results.partial import CommittedResults, LineIndex
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow, Checkpoint, Database
from vllm_batch_server.store.lifecycle import Lifecycle


def read_page(http: httpx.Client, batch_id: str, kind: str = "output", after: int = 0,
              limit: int | None = None) -> tuple[list[bytes], int, str]:
    params: dict[str, Any] = {"after_line": after}
    if limit is not None:
        params["limit"] = limit
    response = http.get(f"/v1/batches/{batch_id}/{kind}", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/jsonl")
    return response.content.splitlines(keepends=True), int(response.headers["x-next-line"]), \
        response.headers["x-batch-status"]


def follow(http: httpx.Client, batch_id: str, kind: str = "output", limit: int = 50) -> list[bytes]:
    """Read a batch's lines as a tailing reader does, until it has ended and nothing more comes."""
    seen: list[bytes] = []
    while True:
        lines, next_line, status = read_page(http, batch_id, kind, len(seen), limit)
        assert next_line == len(seen) + len(lines)
        seen += lines
        if status in TERMINAL and len(lines) < limit:
            return seen


def test_a_running_batch_is_read_in_pages_and_the_pages_add_up_to_the_final_files(
        server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.01", "--window", "4", "--checkpoint-seconds", "0.1"])
    client = sdk(server)
    lines = chat_lines(300)
    for broken in (7, 150, 299):
        lines[broken]["body"]["messages"] = []  # the echo engine answers 400: an error line
    batch = submit(client, lines)
    with httpx.Client(base_url=server.root_url, timeout=30) as http:
        wait_for(client, batch.id, statuses=("in_progress", *TERMINAL))
        first, _, status_then = read_page(http, batch.id, limit=5)
        output = follow(http, batch.id)
        errors = follow(http, batch.id, "errors", limit=2)
    done = wait_for(client, batch.id)
    assert status_then == "in_progress", "the first page was read while the batch ran"
    assert done.status == "completed"
    assert output[:len(first)] == first
    final_output = client.files.content(done.output_file_id).content  # type: ignore[arg-type]
    final_errors = client.files.content(done.error_file_id).content  # type: ignore[arg-type]
    assert b"".join(output) == final_output
    assert b"".join(errors) == final_errors
    assert sorted(json.loads(x)["custom_id"] for x in errors) == ["req-150", "req-299", "req-7"]


def test_reading_after_the_end_and_past_the_last_line(client: Any, shared_server: Any) -> None:
    done = wait_for(client, submit(client, chat_lines(10)).id)
    with httpx.Client(base_url=shared_server.root_url) as http:
        everything, next_line, status = read_page(http, done.id)
        assert (len(everything), next_line, status) == (10, 10, "completed")
        middle, next_line, _ = read_page(http, done.id, after=3, limit=4)
        assert middle == everything[3:7] and next_line == 7
        past, next_line, _ = read_page(http, done.id, after=25)
        assert past == [] and next_line == 25  # a reader ahead of the file stays where it is
        none, next_line, _ = read_page(http, done.id, "errors")
        assert none == [] and next_line == 0  # no error file at all


@pytest.mark.parametrize("query,param", [({"after_line": "-1"}, "after_line"), ({"after_line": "x"}, "after_line"),
                                         ({"limit": "0"}, "limit"), ({"limit": "100001"}, "limit")])
def test_bad_parameters_are_refused_by_name(shared_server: Any, client: Any, query: dict[str, str],
                                            param: str) -> None:
    batch = submit(client, chat_lines(1))
    response = httpx.get(f"{shared_server.root_url}/v1/batches/{batch.id}/output", params=query)
    assert response.status_code == 400
    assert_openai_error(response)
    assert response.json()["error"]["param"] == param


def test_an_unknown_batch_and_a_deleted_result_file_are_404(shared_server: Any, client: Any) -> None:
    missing = httpx.get(f"{shared_server.root_url}/v1/batches/batch_nope/output")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "batch_not_found"
    done = wait_for(client, submit(client, chat_lines(2)).id)
    client.files.delete(done.output_file_id)
    gone = httpx.get(f"{shared_server.root_url}/v1/batches/{done.id}/output")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
    assert done.output_file_id in gone.json()["error"]["message"]


def test_a_line_given_to_a_reader_survives_kill9(server_factory: ServerFactory) -> None:
    """Committed lines only: after a crash and resume, the lines a reader got are the final file's first lines,
    byte for byte (a line read past the committed offset would be cut and computed again, with new ids)."""
    server = server_factory(extra_args=["--echo-delay", "0.02", "--window", "8", "--checkpoint-every", "7",
                                        "--checkpoint-seconds", "0.3"])
    client = sdk(server)
    batch = submit(client, chat_lines(400))
    seen: list[bytes] = []
    with httpx.Client(base_url=server.root_url, timeout=30) as http:
        wait_for(client, batch.id, until=lambda b: (b.request_counts.completed or 0) >= 60)
        for _ in range(20):
            lines, _, status = read_page(http, batch.id, after=len(seen), limit=10_000)
            seen += lines
        assert status == "in_progress" and len(seen) >= 60
    server.kill()
    server.start()
    done = wait_for(client, batch.id, timeout=60)
    final = client.files.content(done.output_file_id).content.splitlines(keepends=True)  # type: ignore[arg-type]
    assert final[:len(seen)] == seen
    assert sorted(json.loads(x)["custom_id"] for x in final) == sorted(f"req-{i}" for i in range(400))


def test_readers_racing_finalizing_never_get_a_server_error(server_factory: ServerFactory) -> None:
    """The part is renamed into the output file at the end: readers hammering the batch right then see the
    same lines whichever they read, and never a 5xx."""
    server = server_factory(extra_args=["--checkpoint-seconds", "0.05", "--checkpoint-every", "3"])
    client = sdk(server)
    problems: list[str] = []
    stop = threading.Event()
    batch_ids: list[str] = []

    def hammer() -> None:
        with httpx.Client(base_url=server.root_url, timeout=30) as http:
            while not stop.is_set():
                for batch_id in list(batch_ids[-2:]):
                    response = http.get(f"/v1/batches/{batch_id}/output", params={"limit": 100_000})
                    if response.status_code != 200:
                        problems.append(f"{response.status_code} {response.text[:200]}")
                    elif any(not line.endswith(b"}") for line in response.content.splitlines()):
                        problems.append("a torn line")

    readers = [threading.Thread(target=hammer) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(15):
            batch = submit(client, chat_lines(60))
            batch_ids.append(batch.id)
            wait_for(client, batch.id)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert problems == []
    for batch_id in batch_ids:
        done = client.batches.retrieve(batch_id)
        assert len(read_jsonl(client, done.output_file_id)) == 60


# ---- the reader at the unit level: real SQLite, real files ------------------------------------------------


async def _running_batch(tmp_path: Path, committed: bytes, extra: bytes) -> tuple[Database, Blobs, BatchRow]:
    blobs = Blobs(tmp_path)
    blobs.prepare()
    db = await Database.open(tmp_path / "db.sqlite3")
    batch = await Lifecycle(db).create(BatchRow(id="batch_unit", endpoint="/v1/chat/completions",
                                                input_file_id="file-x", completion_window="24h",
                                                status=BatchStatus.VALIDATING, created_at=0))
    await Lifecycle(db).move(batch.id, BatchStatus.IN_PROGRESS)
    out_part, _ = blobs.part_paths(batch.id)
    out_part.parent.mkdir(parents=True)
    out_part.write_bytes(committed + extra)
    _checkpoint(db, batch.id, len(committed))
    return db, blobs, batch


def _checkpoint(db: Database, batch_id: str, output_offset: int) -> None:
    """Commit a checkpoint up to `output_offset` of the output part, as a running batch's result log does."""
    committer = Lifecycle(db).checkpoint_committer()
    try:
        committer.commit(batch_id, Checkpoint(output_offset, 0, 0, 0, 0, 0, 0))
    finally:
        committer.close()


def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(b'{"custom_id":"c%d","n":%d}\n' % (i, i) for i in range(start, start + n))


async def _read(results: CommittedResults, batch_id: str, after: int, limit: int) -> tuple[bytes, int]:
    fd, size, status = await results.open(batch_id, "output")
    found = results.locate(batch_id, "output", fd, size, status, after, limit)
    return b"".join(found.chunks()), found.next_line


def test_bytes_past_the_committed_offset_are_never_read(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, blobs, batch = await _running_batch(tmp_path, _lines(5), _lines(3, 5) + b'{"custom_id":"tor')
        results = CommittedResults(db, blobs)
        assert await _read(results, batch.id, 0, 100) == (_lines(5), 5)
        assert await _read(results, batch.id, 5, 100) == (b"", 5)
        _checkpoint(db, batch.id, len(_lines(8)))  # the next checkpoint
        assert await _read(results, batch.id, 5, 100) == (_lines(3, 5), 8)
        await db.close()

    asyncio.run(scenario())


def test_a_part_renamed_by_finalizing_is_read_from_its_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, blobs, batch = await _running_batch(tmp_path, _lines(4), b"")
        results = CommittedResults(db, blobs)
        # Finalizing records the file id first, then renames; the status is still in_progress/finalizing.
        await Lifecycle(db).set_outcome(batch.id, BatchStatus.COMPLETED, output_file_id="file-out")
        os.replace(blobs.part_paths(batch.id)[0], blobs.file_path("file-out"))
        assert await _read(results, batch.id, 1, 2) == (_lines(2, 1), 3)
        # Opened before the rename: the descriptor still reads the same bytes.
        (blobs.file_path("file-out")).rename(blobs.part_paths(batch.id)[0])
        fd, size, status = await results.open(batch.id, "output")
        os.replace(blobs.part_paths(batch.id)[0], blobs.file_path("file-out"))
        found = results.locate(batch.id, "output", fd, size, status, 0, 10)
        assert b"".join(found.chunks()) == _lines(4)
        await db.close()

    asyncio.run(scenario())


def test_a_reader_continuing_does_not_rescan_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line → byte points remembered from earlier answers let a reader continue at line N reading only
    what follows it."""
    async def scenario() -> None:
        body = _lines(60_000)
        db, blobs, batch = await _running_batch(tmp_path, body, b"")
        results = CommittedResults(db, blobs)
        read_bytes = 0
        real_pread = os.pread

        def counting_pread(fd: int, n: int, offset: int) -> bytes:
            nonlocal read_bytes
            data = real_pread(fd, n, offset)
            read_bytes += len(data)
            return data

        monkeypatch.setattr(partial.os, "pread", counting_pread)
        page, next_line = await _read(results, batch.id, 0, 50_000)
        assert next_line == 50_000
        read_bytes = 0
        page, next_line = await _read(results, batch.id, 50_000, 5)
        assert page == _lines(5, 50_000) and next_line == 50_005
        assert read_bytes < 2 * partial.CHUNK < len(body) // 3  # from the point remembered, not the whole file
        await db.close()

    asyncio.run(scenario())


def test_line_index_stays_bounded_and_forgets_the_oldest() -> None:
    index = LineIndex(files=2, points=3)
    for line in range(1, 10):
        index.remember(("b1", "output"), line, line * 10)
    assert index.nearest(("b1", "output"), 100, 10_000) == (9, 90)
    assert index.nearest(("b1", "output"), 5, 10_000) == (0, 0)  # points 1..6 were dropped
    assert index.nearest(("b1", "output"), 9, 75) == (7, 70)  # points past the committed size are not used
    index.remember(("b2", "output"), 1, 10)
    index.remember(("b3", "output"), 1, 10)
    assert index.nearest(("b1", "output"), 9, 1000) == (0, 0)  # least recently used file forgotten
