"""kill -9 the real server mid-batch, three times, and check that the batch still completes exactly once."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import chat_lines, read_jsonl, sdk, submit, wait_for
from tests.helpers.server import make_server

TOTAL = 500


def test_kill9_three_times_mid_batch_then_every_custom_id_exactly_once(tmp_path: Path) -> None:
    # ~10 s of work: 500 requests x 80 ms / 4 in flight; checkpoints every 10 results.
    server = make_server(tmp_path / "data", extra_args=[
        "--echo-delay", "0.08", "--window", "4", "--checkpoint-every", "10", "--checkpoint-seconds", "0.5"])
    server.start()
    try:
        client = sdk(server)
        lines = chat_lines(TOTAL)
        batch_id = submit(client, lines).id
        seen_progress = []
        for fraction in (0.2, 0.5, 0.8):
            target = int(TOTAL * fraction)
            progress = wait_for(client, batch_id, timeout=60,
                                until=lambda b, t=target: b.request_counts.completed >= t)
            assert progress.status == "in_progress", "killed mid-batch, not after it"
            server.kill()
            server.start()
            after = client.batches.retrieve(batch_id)
            # what was committed before the kill is still there; at most one interval was lost
            assert after.request_counts is not None
            assert after.request_counts.completed >= target - 10 - 4
            seen_progress.append(after.request_counts.completed)
        done = wait_for(client, batch_id, timeout=60)
    finally:
        server.kill()

    assert seen_progress == sorted(seen_progress)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (TOTAL, TOTAL, 0)
    server.start()
    try:
        output = read_jsonl(sdk(server), done.output_file_id)
    finally:
        server.kill()
    ids = [line["custom_id"] for line in output]
    assert len(ids) == TOTAL, "nothing duplicated, nothing lost"
    assert set(ids) == {line["custom_id"] for line in lines}
    for line in output:
        number = line["custom_id"].split("-")[1]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"message number {number}"
    assert done.error_file_id is None
    # the batch's working directory is gone once it is finalized
    assert not any((tmp_path / "data" / "batches").iterdir())


def test_graceful_stop_checkpoints_and_resumes(tmp_path: Path) -> None:
    server = make_server(tmp_path / "data", extra_args=["--echo-delay", "0.05", "--window", "4",
                                                         "--checkpoint-every", "1000", "--checkpoint-seconds", "60"])
    server.start()
    try:
        client = sdk(server)
        batch_id = submit(client, chat_lines(200)).id
        wait_for(client, batch_id, until=lambda b: b.status == "in_progress" and b.in_progress_at is not None)
        time.sleep(1.0)  # ~80 results done, none committed by the (long) interval yet
        server.stop()  # SIGTERM: the runner stops and makes what it finished durable
        server.start()
        resumed = client.batches.retrieve(batch_id)
        assert resumed.request_counts is not None and resumed.request_counts.completed >= 40
        done = wait_for(client, batch_id, timeout=60)
        assert done.status == "completed"
        ids = [line["custom_id"] for line in read_jsonl(client, done.output_file_id)]
    finally:
        server.kill()
    assert sorted(ids) == sorted(f"req-{i}" for i in range(200))


def test_kill9_resume_is_exact_when_custom_id_hashes_collide(tmp_path: Path) -> None:
    """Resume matches committed ids to input lines by hash, confirming by the ids themselves when two input lines
    share one. Here every id of the same length shares one (tests/helpers/colliding_ids.py), so the resume takes
    that path for every line: still each request exactly once, and validation still finds no duplicate."""
    server = make_server(tmp_path / "data", module="tests.helpers.colliding_ids", extra_args=[
        "--echo-delay", "0.02", "--window", "4", "--checkpoint-every", "10", "--checkpoint-seconds", "0.2"])
    server.start()
    try:
        client = sdk(server)
        lines = chat_lines(300)  # req-0 ... req-299: three lengths, so three hashes
        batch_id = submit(client, lines).id
        wait_for(client, batch_id, timeout=60, until=lambda b: b.request_counts.completed >= 100)
        server.kill()
        server.start()
        resumed = client.batches.retrieve(batch_id)
        assert resumed.status == "in_progress" and resumed.request_counts is not None
        assert resumed.request_counts.completed >= 80
        done = wait_for(client, batch_id, timeout=60)
        assert done.status == "completed"
        ids = [line["custom_id"] for line in read_jsonl(client, done.output_file_id)]
    finally:
        server.kill()
    assert len(ids) == 300 and set(ids) == {line["custom_id"] for line in lines}
