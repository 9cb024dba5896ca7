"""AsyncVLLMBatch runs the same flows with awaits: the same behaviour, asserted on the same fake."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx
from openai.types import Batch

from tests.client.conftest import BASE, FakeBatchAPI, chat
from vllm_batch import AsyncVLLMBatch, BatchFailedError, BatchResult, BatchStatus, Mark, VLLMBatch

pytestmark = pytest.mark.anyio


async def test_async_full_cycle(api: FakeBatchAPI, tmp_path: Path) -> None:
    seen: list[str] = []

    async def callback(status: BatchStatus) -> None:
        seen.append(status.status)

    async with AsyncVLLMBatch(base_url=BASE, output_dir=tmp_path) as batch:
        ids = [batch.add_to_batch(**chat(f"q{i}")) for i in range(4)]
        status, out, err = await batch.submit_wait_download(callback=callback, progress=False)
        assert status.status == "completed" and out is not None and out.exists() and err is None
        assert await batch.submit() == status.id  # idempotent
        results = [r async for r in batch.results()]
    assert [r.custom_id for r in results] == ids
    assert [r.text for r in results] == [f"m1:q{i}" for i in range(4)]
    assert seen[-1] == "completed" and len(seen) == api.retrieve.call_count
    assert api.create.call_count == 1


async def test_async_sharded_compare_and_resume(api: FakeBatchAPI, tmp_path: Path) -> None:
    async with AsyncVLLMBatch(base_url=BASE, models=["a", "b"], max_requests=2) as batch:
        for i in range(3):
            batch.add_to_batch(custom_id=f"k{i}", messages=[{"role": "user", "content": str(i)}])
        bid = await batch.submit()
        assert len(batch.batch_ids) == 4
    again = await AsyncVLLMBatch.resume(bid, base_url=BASE, output_dir=tmp_path)
    async with again:
        await again.wait(progress=False)
        rows = [c async for c in again.compare()]
        out, _ = await again.download()
    assert [c.custom_id for c in rows] == ["k0", "k1", "k2"]
    assert rows[2].results["b"].text == "b:2"
    assert out is not None and len(out.read_text().splitlines()) == 6


async def test_async_cancel_and_failure(api: FakeBatchAPI) -> None:
    async with AsyncVLLMBatch(base_url=BASE) as batch:
        batch.add_to_batch(**chat("x"))
        batch.add_to_batch(**chat("y"))
        await batch.submit()
        assert (await batch.cancel()).status == "cancelled"
        assert api.cancel.call_count == 1
        results = [r async for r in batch.results()]
        assert [r.ok for r in results] == [True, False]
    api.steps = ["validating", "failed"]
    async with AsyncVLLMBatch(base_url=BASE) as batch:
        batch.add_to_batch(**chat("x"))
        await batch.submit()
        with pytest.raises(BatchFailedError):
            await batch.wait(progress=False)


async def test_async_list(api: FakeBatchAPI) -> None:
    async with AsyncVLLMBatch(base_url=BASE) as batch:
        batch.add_to_batch(**chat("x"))
        bid = await batch.submit()
        assert [b.id for b in await batch.list_batches()] == [bid]


async def test_a_cancelled_wait_closes_its_flow_at_once(api: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    import vllm_batch._async

    closed: list[str] = []
    monkeypatch.setattr("vllm_batch._progress.ProgressBar.close", lambda self: closed.append("bar"))

    async def sleep_long(seconds: float) -> None:
        await anyio.sleep(3600)

    async with AsyncVLLMBatch(base_url=BASE) as batch:
        batch.add_to_batch(**chat("x"))
        await batch.submit()
        monkeypatch.setattr(vllm_batch._async, "_sleep", sleep_long)
        flows = []  # held here, so only an explicit close() can end the flow
        original = batch._core.wait
        monkeypatch.setattr(batch._core, "wait", lambda **kw: flows.append(original(**kw)) or flows[-1])
        with anyio.move_on_after(0.2):
            await batch.wait(progress=True)
        # Closed when the task was cancelled, not whenever the generator gets collected.
        assert closed == ["bar"] and flows[0].gi_frame is None



async def test_both_clients_return_the_same_types(sleeps: list[float], tmp_path: Path) -> None:
    """The rule in docs/client.md: openai's Batch for a server batch, our dataclasses for what the client puts
    together or only our server has, dicts for the bodies it carries; alike in both clients."""
    marks = httpx.Response(200, json={"object": "list", "has_more": False, "last_id": "k", "data": [
        {"custom_id": "k", "label": "gold", "score": None, "note": None, "batch_id": "b"}]})

    def retried(api: FakeBatchAPI, batch_id: str) -> None:
        """A batch on the server that retries `batch_id`, for retries() to find."""
        original = api.batches[batch_id]
        api._store_batch({"input_file_id": original["input_file_id"], "endpoint": original["endpoint"],
                          "completion_window": "24h", "metadata": {"retry_of": batch_id}})

    with respx.mock(assert_all_called=False) as router:
        api = FakeBatchAPI(router)
        router.get(url__regex=rf"{BASE}/batches/[^/]+/marks").mock(return_value=marks)
        with VLLMBatch(base_url=BASE, workdir=tmp_path / "s") as sync_batch:
            sync_batch.add_to_batch(custom_id="k", **chat("x"))
            retried(api, sync_batch.submit())
            status = sync_batch.wait(progress=False)
            [result] = list(sync_batch.results())
            sync_types = [type(status), type(status.batches[0]), type(sync_batch.list_batches()[0]),
                          type(sync_batch.retries()[0]), type(result), type(result.response),
                          type(sync_batch.marks()[0])]
        async with AsyncVLLMBatch(base_url=BASE, workdir=tmp_path / "a") as batch:
            batch.add_to_batch(custom_id="k", **chat("x"))
            retried(api, await batch.submit())
            status = await batch.wait(progress=False)
            [result] = [r async for r in batch.results()]
            async_types = [type(status), type(status.batches[0]), type((await batch.list_batches())[0]),
                           type((await batch.retries())[0]), type(result), type(result.response),
                           type((await batch.marks())[0])]
    assert sync_types == async_types == [BatchStatus, Batch, Batch, Batch, BatchResult, dict, Mark]
