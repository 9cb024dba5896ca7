"""The queue is strictly first-in, first-out: a newer batch never overtakes one still being validated."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.queue.scheduler import Scheduler
from vllm_batch_server.settings import Settings
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import BatchRow, Database
from vllm_batch_server.store.lifecycle import Lifecycle


def test_next_batch_waits_for_an_older_batch_in_validation(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = Settings(data_dir=tmp_path, engine="echo", models=["a", "b"])
        blobs = Blobs(tmp_path)
        blobs.prepare()
        db = await Database.open(settings.db_path)
        lifecycle = Lifecycle(db)
        scheduler = Scheduler(db, blobs, EchoEngine(settings), settings, lifecycle)

        def row(batch_id: str) -> BatchRow:
            return BatchRow(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-x",
                            completion_window="24h", status=BatchStatus.VALIDATING, created_at=0, total=1)

        await lifecycle.create(row("batch_older"))
        await lifecycle.create(row("batch_newer"))
        await lifecycle.move("batch_newer", BatchStatus.IN_PROGRESS, model="b")
        assert await scheduler._next_batch() is None  # the newer one must not jump the queue

        await lifecycle.move("batch_older", BatchStatus.IN_PROGRESS, model="a")
        first = await scheduler._next_batch()
        assert first is not None and first.id == "batch_older"

        await lifecycle.move("batch_older", BatchStatus.FAILED)
        second = await scheduler._next_batch()
        assert second is not None and second.id == "batch_newer"
        await db.close()

    asyncio.run(scenario())
