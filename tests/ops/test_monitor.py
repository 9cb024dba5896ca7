"""The monitor adds up ended batches once and reads only active and newly ended ones after that: at every
step its numbers equal a full sum over the table, and they only ever grow."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

from vllm_batch_server.observers.monitor import Monitor
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.database import BatchRow, Checkpoint, Database
from vllm_batch_server.store.lifecycle import Lifecycle

S = BatchStatus


async def full_sums(db: Database) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, ...]]]:
    # Read on a connection of the test's own: the database's query helpers are its own business.
    with sqlite3.connect(db.path) as conn:
        counts = {row[0]: row[1] for row in conn.execute("SELECT status, COUNT(*) FROM batches GROUP BY status")}
        totals = {(row[0], row[1]): tuple(row[2:]) for row in conn.execute(
            "SELECT model, endpoint, SUM(completed), SUM(failed), SUM(input_tokens), SUM(cached_tokens), "
            "SUM(output_tokens) FROM batches WHERE model IS NOT NULL GROUP BY model, endpoint")}
    return counts, totals


def test_incremental_numbers_equal_a_full_sum(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await Database.open(tmp_path / "db.sqlite3")
        try:
            lifecycle = Lifecycle(db)
            rng = random.Random(7)
            active: list[str] = []
            monitors = [Monitor(db)]
            previous = 0
            for step in range(300):
                action = rng.random()
                if action < 0.3 or not active:
                    batch_id = f"batch_{step:06d}"
                    await lifecycle.create(BatchRow(id=batch_id, endpoint=rng.choice(["/v1/embeddings",
                                                    "/v1/chat/completions"]), input_file_id="file-a",
                                                    completion_window="24h", status=S.VALIDATING, created_at=step))
                    if rng.random() < 0.2:
                        await lifecycle.move(batch_id, S.FAILED)  # failed validation: no model
                    else:
                        await lifecycle.move(batch_id, S.IN_PROGRESS, model=rng.choice(["a", "b"]), total=10)
                        active.append(batch_id)
                elif action < 0.8:  # a checkpoint
                    batch_id = rng.choice(active)
                    batch = await db.get_batch(batch_id)
                    assert batch is not None
                    committer = lifecycle.checkpoint_committer()
                    committer.commit(batch_id, Checkpoint(
                        batch.output_offset, batch.error_offset, batch.completed + rng.randint(0, 5),
                        batch.failed + rng.randint(0, 1), batch.input_tokens + 30, batch.cached_tokens,
                        batch.output_tokens + 7))
                    committer.close()
                else:  # the batch ends, one way or another
                    batch_id = active.pop(rng.randrange(len(active)))
                    ending = rng.choice([S.COMPLETED, S.EXPIRED, S.FAILED, S.CANCELLED])
                    if ending is S.COMPLETED:
                        await lifecycle.move(batch_id, S.FINALIZING)
                    elif ending is S.CANCELLED:
                        await lifecycle.move(batch_id, S.CANCELLING)
                    await lifecycle.move(batch_id, ending)
                if step % 50 == 25:
                    monitors.append(Monitor(db))  # one that starts late reads the history in one go
                counts, totals = await full_sums(db)
                for monitor in monitors:
                    await monitor._take()
                    snapshot = monitor.latest
                    assert {k: v for k, v in snapshot.batch_counts.items() if v} == counts, step
                    assert {(t.model, t.endpoint): (t.completed, t.failed, t.input_tokens, t.cached_tokens,
                                                    t.output_tokens) for t in snapshot.totals} == totals, step
                assert monitors[0].latest.results >= previous
                previous = monitors[0].latest.results
        finally:
            await db.close()

    asyncio.run(scenario())
