"""The queue is strictly first-in, first-out: a newer batch never overtakes one still being validated."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.scheduler import Scheduler
from vllm_batch_server.settings import Settings
from vllm_batch_server.storage import Storage
from vllm_batch_server.store import BatchRow, Store


def test_next_batch_waits_for_an_older_batch_in_validation(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = Settings(data_dir=tmp_path, engine="echo", models=["a", "b"])
        storage = Storage(tmp_path)
        storage.prepare()
        store = await Store.open(settings.db_path)
        scheduler = Scheduler(store, storage, EchoEngine(settings), settings)

        def row(batch_id: str, status: str, model: str | None) -> BatchRow:
            return BatchRow(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-x",
                            completion_window="24h", status=status, created_at=0, model=model, total=1)

        await store.insert_batch(row("batch_older", "validating", None))
        await store.insert_batch(row("batch_newer", "in_progress", "b"))
        assert await scheduler._next_batch() is None  # the newer one must not jump the queue

        await store.update_batch("batch_older", status="in_progress", model="a")
        first = await scheduler._next_batch()
        assert first is not None and first.id == "batch_older"

        await store.update_batch("batch_older", status="failed")
        second = await scheduler._next_batch()
        assert second is not None and second.id == "batch_newer"
        await store.close()

    asyncio.run(scenario())
