"""50 concurrent clients upload, poll and list while a batch runs: no error, no "database is locked", and
status calls stay fast. (benchmarks/load_status.py is the longer measurement.)"""

from __future__ import annotations

import asyncio

from benchmarks.load_status import run_load, start_batch
from tests.conftest import ServerFactory, sdk, wait_for
from tests.faults.checks import assert_exactly_once


def test_fifty_clients_while_a_batch_runs(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.002", "--window", "32", "--checkpoint-every", "50"])
    batch_id = start_batch(server.root_url, 3000)
    report = asyncio.run(run_load(server.root_url, batch_id, clients=50, seconds=4))
    summary = report.summary()
    assert report.errors == [], report.errors[:5]
    assert summary["ops"]["status"]["calls"] >= 100
    assert summary["ops"]["upload"]["calls"] >= 5
    # generous for a loaded 2-core machine; the benchmark reports the real numbers
    assert summary["ops"]["status"]["p50_ms"] < 1000, summary
    client = sdk(server)
    done = wait_for(client, batch_id, timeout=120)
    assert done.status == "completed"
    assert_exactly_once(client, done, {f"r{i}" for i in range(3000)})
    assert "database is locked" not in server.log()
    # every upload made under load is listed and whole
    assert len(client.files.list(purpose="batch").data) == summary["ops"]["upload"]["calls"] + 1
