"""Past a provider's request or byte limit, one logical batch becomes several server batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.client.conftest import BASE, FakeBatchAPI, chat
from vllm_batch import Provider, VLLMBatch
from vllm_batch._requests import dumps


def line_size(custom_id: str, text: str) -> int:
    return len(dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": chat(text)}))


def submit(api: FakeBatchAPI, tmp_path: Path, n: int, **limits) -> VLLMBatch:
    batch = VLLMBatch(base_url=BASE, output_dir=tmp_path, **limits)
    for i in range(n):
        batch.add_to_batch(custom_id=f"c{i}", **chat(f"t{i}"))
    batch.submit()
    return batch


@pytest.mark.parametrize(("n", "expected"), [(4, [4]), (5, [4, 1]), (8, [4, 4]), (9, [4, 4, 1])])
def test_request_limit_boundaries(api: FakeBatchAPI, tmp_path: Path, n: int, expected: list[int]) -> None:
    with submit(api, tmp_path, n, max_requests=4) as batch:
        sizes = [len(api.input_lines(b)) for b in batch.batch_ids]
        assert sizes == expected
        assert api.create.call_count == len(expected) == api.upload.call_count
        # Every request went exactly once, in order.
        sent = [line["custom_id"] for b in batch.batch_ids for line in api.input_lines(b)]
        assert sent == [f"c{i}" for i in range(n)]


def test_byte_limit_exactly_at_and_one_past(api: FakeBatchAPI, tmp_path: Path) -> None:
    # c0..c2 have the same size; a file of exactly three lines is allowed, one byte less is not.
    three = sum(line_size(f"c{i}", f"t{i}") for i in range(3))
    with submit(api, tmp_path, 3, max_bytes=three) as batch:
        assert len(batch.batch_ids) == 1
        assert len(api.files[api.batches[batch.id]["input_file_id"]]) == three
    with submit(api, tmp_path, 3, max_bytes=three - 1) as batch:
        assert [len(api.input_lines(b)) for b in batch.batch_ids] == [2, 1]
        for b in batch.batch_ids:
            assert len(api.files[api.batches[b]["input_file_id"]]) <= three - 1


def test_shards_are_tagged_and_tracked_as_one(api: FakeBatchAPI, tmp_path: Path) -> None:
    with submit(api, tmp_path, 5, max_requests=2) as batch:
        assert batch.id == batch.batch_ids[0] and len(batch.batch_ids) == 3
        tags = [api.batches[b]["metadata"] for b in batch.batch_ids]
        assert [t["vllm_batch_shard"] for t in tags] == ["0/3", "1/3", "2/3"]
        assert len({t["vllm_batch_group"] for t in tags}) == 1
        status = batch.wait(progress=False)
        assert status.status == "completed" and status.request_counts.total == 5
        assert status.request_counts.completed == 5 and len(status.batches) == 3
        out, err = batch.download()
        assert err is None
        assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [f"c{i}" for i in range(5)]
        assert [r.custom_id for r in batch.results()] == [f"c{i}" for i in range(5)]


def test_one_failed_shard_fails_the_whole_and_keeps_the_rest(api: FakeBatchAPI, tmp_path: Path) -> None:
    with submit(api, tmp_path, 4, max_requests=2) as batch:
        second = batch.batch_ids[1]
        api.batches[second]["status"] = "failed"
        status = batch.wait(progress=False, raise_on_failure=False)
        assert status.status == "failed"
        results = list(batch.results())
    assert [r.ok for r in results] == [True, True, False, False]
    assert "failed" in results[2].error.message


def test_resume_finds_every_shard(api: FakeBatchAPI, tmp_path: Path) -> None:
    with submit(api, tmp_path, 5, max_requests=2) as batch:
        ids = batch.batch_ids
    # Some unrelated batches in between, and a listing page of 2, so discovery has to paginate.
    with submit(api, tmp_path, 1) as other:
        other.wait(progress=False)
    with submit(api, tmp_path, 1):
        pass
    api.max_page = 2
    # Newest first, two a page: [2 strangers], [shard 2, shard 1], [shard 0]. Listing stops once all are found.
    for bid, pages in ((ids[1], 3), (ids[0], 2)):
        api.listing.reset()
        with VLLMBatch.resume(bid, base_url=BASE) as again:
            assert again.batch_ids == ids
            again.wait(progress=False)
            assert [r.custom_id for r in again.results()] == [f"c{i}" for i in range(5)]
        assert api.listing.call_count == pages


def test_partial_submit_is_finished_not_repeated(api: FakeBatchAPI, tmp_path: Path, sleeps) -> None:
    import httpx

    from vllm_batch import RetryPolicy

    batch = VLLMBatch(base_url=BASE, max_requests=2, retry=RetryPolicy(max_attempts=1))
    for i in range(5):
        batch.add_to_batch(**chat(str(i)))
    api.create.side_effect = [api._create, httpx.Response(400, json={"error": {"message": "quota"}}), api._create,
                              api._create]
    with batch:
        with pytest.raises(Exception, match="quota"):
            batch.submit()
        assert len(api.batches) == 1
        batch.submit()
        assert len(api.batches) == 3 and len(batch.batch_ids) == 3
    assert api.upload.call_count == 3  # the second shard's file was uploaded once, reused on the retry


def test_comparison_runs_each_model_and_aligns(api: FakeBatchAPI, tmp_path: Path) -> None:
    models = ["small", "medium-model", "large"]
    with VLLMBatch(base_url=BASE, models=models, max_requests=2, output_dir=tmp_path) as batch:
        for i in range(3):
            batch.add_to_batch(custom_id=f"q{i}", messages=[{"role": "user", "content": f"t{i}"}])
        batch.submit_wait_download(progress=False)
        by_model = {}
        for b in batch.batch_ids:
            for line in api.input_lines(b):
                by_model.setdefault(line["body"]["model"], []).append(line["custom_id"])
        assert by_model == {m: ["q0", "q1", "q2"] for m in models}
        assert len(batch.batch_ids) == 6  # 2 shards per model
        comparisons = list(batch.compare())
        flat = list(batch.results())
    assert [c.custom_id for c in comparisons] == ["q0", "q1", "q2"]
    assert list(comparisons[1].results) == models
    assert comparisons[1].results["large"].text == "large:t1"
    assert "model" not in comparisons[1].request
    assert [(r.custom_id, r.model) for r in flat[:3]] == [("q0", m) for m in models]


def test_comparison_resumes_with_its_models(api: FakeBatchAPI, tmp_path: Path) -> None:
    with VLLMBatch(base_url=BASE, models=["a", "b"]) as batch:
        batch.add_to_batch(messages=[{"role": "user", "content": "hi"}])
        bid = batch.submit()
    with VLLMBatch.resume(bid, base_url=BASE) as again:
        again.wait(progress=False)
        [comparison] = again.compare()
    assert {m: r.text for m, r in comparison.results.items()} == {"a": "a:hi", "b": "b:hi"}


def test_mixed_models_in_one_file_when_the_provider_allows(api: FakeBatchAPI, tmp_path: Path) -> None:
    mixing = Provider("mix", BASE, mixed_models=True)
    with VLLMBatch(provider=mixing) as batch:
        batch.add_to_batch(**chat("x", model="a"))
        batch.add_to_batch(**chat("y", model="b"))
        batch.submit()
        assert len(batch.batch_ids) == 1
        assert [x["body"]["model"] for x in api.input_lines(batch.id)] == ["a", "b"]


def test_a_sharded_download_into_a_folder_that_does_not_exist_yet(api: FakeBatchAPI, tmp_path: Path) -> None:
    with submit(api, tmp_path, 5, max_requests=2) as batch:
        batch.wait(progress=False)
        out, _ = batch.download(tmp_path / "new" / "deeper" / "all.jsonl")
        assert out is not None and len(out.read_text().splitlines()) == 5


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_limits_must_be_positive_whole_numbers(limit: object) -> None:
    from vllm_batch import ConfigurationError

    for name in ("max_requests", "max_bytes"):
        with pytest.raises(ConfigurationError, match=f"{name} must be a positive whole number"):
            VLLMBatch(base_url=BASE, **{name: limit})
