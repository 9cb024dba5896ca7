"""GET /status (the contract the dashboard reads) and GET /ready (true only when the store takes writes, the
engine is loaded or loadable, and no batch is paused for a resource)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppFactory, chat_lines, sdk, submit, wait_for
from tests.helpers.disk import fill, mounted_small_disk
from tests.helpers.server import RunningServer, make_server

KEY = "sk-status"


def get_status(server: RunningServer) -> dict[str, Any]:
    response = server.http.get(server.root_url + "/status", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def get_ready(server: RunningServer) -> tuple[int, dict[str, Any]]:
    response = server.http.get(server.root_url + "/ready", timeout=30)
    return response.status_code, response.json()


def test_status_has_the_contracts_shape_and_follows_a_batch(app_factory: AppFactory) -> None:
    server = app_factory(api_key=KEY, extra_args=["--echo-delay", "0.01", "--window", "4"])
    assert server.http.get(server.root_url + "/status").status_code == 401
    idle = get_status(server)
    assert set(idle) == {"object", "version", "engine", "queue", "throughput", "disk", "checkpoint", "running"}
    assert idle["running"] == []
    assert idle["object"] == "server.status" and isinstance(idle["version"], str)
    assert idle["engine"] == {"kind": "echo", "state": "idle", "model": None, "kv_cache_usage": None,
                              "max_loaded_models": 1, "loaded_models": []}
    assert idle["queue"] == {"validating": 0, "in_progress": 0, "paused": []}
    assert idle["throughput"] == {"requests_per_second": 0.0, "output_tokens_per_second": 0.0}
    assert 0 < idle["disk"]["free_bytes"] <= idle["disk"]["total_bytes"]

    client = sdk(server)
    batch = submit(client, chat_lines(1500))
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.batches.retrieve(batch.id).status != "completed":
        samples.append(get_status(server))
        time.sleep(0.3)
    # Seen running: the engine loaded and the batch counted as in progress in the same answer.
    assert any(now["queue"]["in_progress"] == 1 and now["engine"]["state"] == "ready"
               and now["engine"]["model"] == "echo-model" and now["running"] == [batch.id]
               and now["engine"]["loaded_models"] == [{"model": "echo-model", "state": "ready", "running": [batch.id],
                                                       "kv_cache_usage": None, "cpu_cores": None}]
               for now in samples), samples
    # The busiest answer may come as the batch ends (the rate covers the last seconds, while the counts move
    # to completed), so it is judged on its rate alone.
    busiest = max(samples, key=lambda now: now["throughput"]["requests_per_second"])
    assert busiest["throughput"]["requests_per_second"] > 0, "no throughput was ever reported"
    # 4 requests in flight, 10 ms each: about 400 a second, as measured over the last seconds.
    assert 50 < busiest["throughput"]["requests_per_second"] < 800
    assert busiest["throughput"]["output_tokens_per_second"] > 0
    assert wait_for(client, batch.id).status == "completed"
    time.sleep(1.1)  # the counts are read from SQLite at most once a second
    assert get_status(server)["queue"]["in_progress"] == 0


def test_ready_on_a_healthy_server_and_preload_loads_before_serving(app_factory: AppFactory) -> None:
    server = app_factory(api_key=KEY, extra_args=["--preload"])
    # /health answered, so start-up is over: the engine was loaded before the server listened.
    assert get_status(server)["engine"] == {
        "kind": "echo", "state": "ready", "model": "echo-model", "kv_cache_usage": None, "max_loaded_models": 1,
        "loaded_models": [{"model": "echo-model", "state": "ready", "running": [], "kv_cache_usage": None,
                           "cpu_cores": None}]}
    assert get_ready(server) == (200, {"ready": True, "reasons": []})


def test_not_ready_when_no_model_can_be_loaded(tmp_path: Path) -> None:
    """The vLLM engine with an embedded model that was never prepared (no vLLM is started for this)."""
    server = make_server(tmp_path / "data", engine="vllm", models=["smollm2-135m-instruct"],
                         extra_args=["--model-cache-dir", str(tmp_path / "empty-cache"), "--preload"]).start()
    try:
        code, body = get_ready(server)
        assert code == 503 and body["ready"] is False
        assert any("could not be loaded" in reason for reason in body["reasons"]), body
        assert any("models prepare" in reason for reason in body["reasons"]), body
        assert server.http.get(server.root_url + "/health").status_code == 200  # alive all the same
    finally:
        server.kill()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_small_disk(tmp_path / "disk") as mount:
        yield mount


def test_not_ready_while_a_batch_is_paused_for_disk(small_disk: Path, tmp_path: Path) -> None:
    server = make_server(small_disk / "data", api_key=KEY, extra_args=[
        "--echo-delay", "0.005", "--window", "4", "--checkpoint-every", "10"])
    server.log_path = tmp_path / "server.log"
    server.start()
    try:
        client = sdk(server)
        batch = submit(client, chat_lines(3000))
        wait_for(client, batch.id, until=lambda b: b.request_counts.completed > 20)
        filler = fill(small_disk)
        deadline = time.monotonic() + 30
        while not get_status(server)["queue"]["paused"]:
            assert time.monotonic() < deadline, "the batch never paused"
            time.sleep(0.2)
        assert get_status(server)["queue"]["paused"] == [{"id": batch.id, "reason": "out of disk space"}]
        code, body = get_ready(server)
        assert code == 503 and "1 batch paused: out of disk space" in body["reasons"]
        assert batch.id not in str(body)  # /ready is open: it names no batch
        filler.unlink()
        assert wait_for(client, batch.id, timeout=60).status == "completed"
        assert get_ready(server)[0] == 200
    finally:
        server.kill()


def test_not_ready_when_the_data_directory_turns_read_only(tmp_path: Path) -> None:
    """The data directory made read-only under the running server (a read-only bind mount over it: what a
    filesystem remounted read-only after an error looks like to new files)."""
    server = make_server(tmp_path / "data").start()
    data = str(server.data_dir)
    try:
        assert get_ready(server)[0] == 200
        bound = subprocess.run(["mount", "--bind", data, data], capture_output=True, text=True)
        if bound.returncode != 0:
            pytest.skip(f"cannot bind-mount here (needs root): {bound.stderr.strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", data], check=True)
            code, body = get_ready(server)
            assert code == 503 and "does not take writes" in body["reasons"][0], body
            assert "Read-only file system" in body["reasons"][0]
        finally:
            subprocess.run(["umount", data], check=True)
        assert get_ready(server)[0] == 200
    finally:
        server.kill()
