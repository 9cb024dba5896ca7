"""The durability contract at the unit level: what a checkpoint commits, and what a restart keeps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from vllm_batch_server.checkpoint import ResultLog
from vllm_batch_server.engines.base import Result, Usage
from vllm_batch_server.settings import Settings
from vllm_batch_server.storage import Storage
from vllm_batch_server.store import BatchRow, Store


def _ok(n: int) -> Result:
    return Result(200, {"n": n}, Usage(input_tokens=2, cached_tokens=1, output_tokens=3))


async def _setup(tmp_path: Path) -> tuple[Store, Storage, Settings, BatchRow]:
    settings = Settings(data_dir=tmp_path, engine="echo", models=["m"], checkpoint_every=1000,
                        checkpoint_seconds=3600)
    storage = Storage(tmp_path)
    storage.prepare()
    store = await Store.open(settings.db_path)
    batch = await store.insert_batch(BatchRow(id="batch_test", endpoint="/v1/chat/completions",
                                              input_file_id="file-x", completion_window="24h",
                                              status="in_progress", created_at=0, total=10))
    return store, storage, settings, batch


def test_only_checkpointed_results_survive_and_the_torn_tail_is_cut(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, storage, settings, batch = await _setup(tmp_path)
        log = ResultLog(store, storage, settings, batch)
        for i in range(3):
            log.append(f"ok-{i}", _ok(i))
        log.append("bad-0", Result.error(400, "too long", param="messages"))
        await log.checkpoint()
        log.append("ok-3", _ok(3))  # appended, flushed even, but never committed
        log.out.flush()
        log.close()
        out_part, _ = storage.part_paths(batch.id)
        with open(out_part, "ab") as fh:
            fh.write(b'{"custom_id": "torn')  # a crash in the middle of a write

        row = await store.get_batch(batch.id)
        assert row is not None
        assert (row.completed, row.failed) == (3, 1)
        assert (row.input_tokens, row.cached_tokens, row.output_tokens) == (6, 3, 9)
        assert ResultLog.recover(storage, row) == {"ok-0", "ok-1", "ok-2", "bad-0"}

        resumed = ResultLog(store, storage, settings, row)  # opening cuts the parts back
        assert out_part.stat().st_size == row.output_offset
        resumed.append("ok-3", _ok(3))
        await resumed.checkpoint(final=True)
        resumed.close()
        lines = [json.loads(line) for line in out_part.read_text().splitlines()]
        assert [line["custom_id"] for line in lines] == ["ok-0", "ok-1", "ok-2", "ok-3"]
        await store.close()

    asyncio.run(scenario())


def test_a_part_shorter_than_its_committed_offset_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, storage, settings, batch = await _setup(tmp_path)
        log = ResultLog(store, storage, settings, batch)
        log.append("ok-0", _ok(0))
        await log.checkpoint()
        log.close()
        out_part, _ = storage.part_paths(batch.id)
        out_part.write_bytes(b"")  # the disk lost committed data
        row = await store.get_batch(batch.id)
        assert row is not None
        try:
            ResultLog(store, storage, settings, row)
        except OSError as exc:
            assert "shorter than its committed" in str(exc)
        else:
            raise AssertionError("silently zero-filled lost results")
        await store.close()

    asyncio.run(scenario())
