"""Echo replicas as Ray actors on a local Ray cluster the test starts; replicas are killed mid-batch (one for
good, one for Ray to restart) and the batch completes with every custom_id exactly once.

Opt-in: needs the `ray` extra and BATCH_SLOW_TESTS=1 (about a minute, most of it starting and stopping Ray;
kept out of CI's default run, which has a budget). Passed 2026-11-30 (docs/scale.md).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, chat_lines, sdk, submit, wait_for
from tests.faults.checks import assert_echo_answers, assert_exactly_once
from tests.helpers.ray_cluster import RayHead, start_head

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("BATCH_SLOW_TESTS"),
                                 reason="set BATCH_SLOW_TESTS=1 to start a local Ray cluster (about a minute)"),
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs "vllm-batch[ray]"')]

REPLICAS = 3
MAX_NUM_SEQS = 4  # each echo replica then takes 2 x 4 requests at once, as vLLM would


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    head = start_head()
    yield head
    head.stop()


def test_batch_completes_when_replicas_die_mid_batch(server_factory: ServerFactory, ray_head: RayHead,
                                                     tmp_path: Path) -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    journal = tmp_path / "computed.txt"  # every replica appends the ids it computed
    server = server_factory(engine="ray", models=["echo-model"], extra_args=[
        "--ray-address", ray_head.address, "--ray-namespace", namespace, "--replicas", str(REPLICAS),
        "--replica-engine", "echo", "--replica-cpus", "1", "--max-num-seqs", str(MAX_NUM_SEQS),
        "--echo-delay", "0.1", "--echo-fault", f"journal={journal}", "--backend-probe-seconds", "2"])
    client = sdk(server)
    n = 3000  # about 13 s at 24 in flight
    batch_id = submit(client, chat_lines(n)).id
    running = wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 200, timeout=180)
    assert running.status == "in_progress", running
    # One replica killed for good (the server creates it again), one killed for Ray to restart.
    ray_head.run_driver(f"ray.kill(ray.get_actor('replica-1', namespace={namespace!r}))\n"
                        f"ray.kill(ray.get_actor('replica-2', namespace={namespace!r}), no_restart=False)")
    assert client.batches.retrieve(batch_id).status == "in_progress"  # the kills were mid-batch
    batch = wait_for(client, batch_id, timeout=180)

    assert batch.status == "completed", batch
    lines = assert_exactly_once(client, batch, {f"req-{i}" for i in range(n)})
    assert_echo_answers(lines)
    log = "\n".join(line for line in server.log_path.read_text().splitlines() if "engines." in line)
    assert log.count("is out of rotation") >= 2, log
    for name in ("replica-1", "replica-2"):
        assert log.count(f"ray {name} is in rotation") >= 2, log  # started, then back after its death
    # Work lost with the two replicas: at most what they had in flight.
    computed = Counter(journal.read_text().split())
    assert set(computed) == {f"{batch_id}-{i + 1}" for i in range(n)}
    recomputed = sum(count - 1 for count in computed.values())
    assert recomputed <= 2 * 2 * MAX_NUM_SEQS, recomputed
    assert "engine failed on batch" not in server.log_path.read_text()  # the batch saw no engine failure
