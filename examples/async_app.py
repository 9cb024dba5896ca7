"""Embedding the async client in an application: a worker coroutine that runs a batch job.

An app (a web service, a queue worker) hands `run_job` a list of texts; the job submits them as one batch,
reports progress through a callback instead of a terminal progress bar, and returns the summaries in order.
Other coroutines keep running while it waits. Reads BATCH_BASE_URL and MODEL.

    python examples/async_app.py
"""

from __future__ import annotations

import asyncio
import os

from vllm_batch import AsyncVLLMBatch, BatchStatus, VLLMBatchError

MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")


async def report(status: BatchStatus) -> None:
    # In an app this would update a job row or push to a websocket.
    counts = status.request_counts
    print(f"[job] {status.id}: {status.status} {counts.done}/{counts.total}")


async def run_job(texts: list[str]) -> list[str]:
    async with AsyncVLLMBatch() as batch:
        for n, text in enumerate(texts):
            batch.add_to_batch(
                custom_id=f"doc-{n}",
                model=MODEL,
                messages=[
                    {"role": "system", "content": "Summarise the text in five words."},
                    {"role": "user", "content": text},
                ],
                max_tokens=24,
            )
        await batch.submit(metadata={"job": "summaries"})
        await batch.wait(poll_interval=5, timeout=3600, callback=report, progress=False)
        return [(r.text or "") if r.error is None else f"<failed: {r.error.code}>" async for r in batch.results()]


async def heartbeat(stop: asyncio.Event) -> None:
    """Stands for the rest of the application, which keeps running while the batch is waited on."""
    beats = 0
    while not stop.is_set():
        beats += 1
        await asyncio.sleep(0.1)
    print(f"[app] stayed responsive: {beats} heartbeats during the job")


async def main() -> None:
    documents = [
        "The cat sat on the mat all afternoon, watching the birds outside.",
        "Quarterly revenue grew by twelve percent, driven by new subscriptions.",
        "The bridge will be closed for repairs from Monday to Friday next week.",
    ]
    stop = asyncio.Event()
    beating = asyncio.create_task(heartbeat(stop))
    try:
        summaries = await run_job(documents)
    except VLLMBatchError as exc:
        raise SystemExit(f"job failed: {exc}") from exc
    finally:
        stop.set()
        await beating
    for doc, summary in zip(documents, summaries, strict=True):
        print(f"- {doc[:40]}... -> {summary}")


if __name__ == "__main__":
    asyncio.run(main())
