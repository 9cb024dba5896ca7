"""GET /metrics: the exposition parsed with prometheus-client's own parsers, its numbers checked against what
the batches did, its access rules, and that no label carries a batch id or user data."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerFactory, chat_lines, request_line, sdk, submit, wait_for
from tests.helpers.server import RunningServer
from vllm_batch_server.observers import metrics

KEY = "sk-metrics-test"


def scrape(server: RunningServer, **headers: str) -> dict[str, Any]:
    """{sample name: {labels tuple: value}} from the text exposition."""
    auth = {"authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    response = httpx.get(server.root_url + "/metrics", headers={**auth, **headers}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    return float(samples.get(name, {}).get(wanted, 0.0))


def test_numbers_match_what_the_batches_did(server_factory: ServerFactory) -> None:
    server = server_factory(api_key=KEY)
    client = sdk(server)
    chat = wait_for(client, submit(client, chat_lines(7)).id)
    embed_lines = [request_line(f"e{i}", f"text {i}", model="echo-embed", url="/v1/embeddings") for i in range(4)]
    embed = wait_for(client, submit(client, embed_lines, endpoint="/v1/embeddings").id)
    assert chat.status == embed.status == "completed"
    time.sleep(1.1)  # the numbers read from SQLite are at most a second old
    samples = scrape(server)

    chat_labels = {"model": "echo-model", "endpoint": "/v1/chat/completions"}
    assert value(samples, "vllm_batch_requests_total", **chat_labels, outcome="succeeded") == 7
    assert value(samples, "vllm_batch_requests_total", **chat_labels, outcome="failed") == 0
    assert value(samples, "vllm_batch_requests_total", model="echo-embed", endpoint="/v1/embeddings",
                 outcome="succeeded") == 4
    assert value(samples, "vllm_batch_prompt_tokens_total", **chat_labels) == chat.usage.input_tokens > 0
    assert value(samples, "vllm_batch_completion_tokens_total", **chat_labels) == chat.usage.output_tokens > 0
    assert value(samples, "vllm_batch_cached_tokens_total", **chat_labels) == (
        chat.usage.input_tokens_details.cached_tokens)
    assert value(samples, "vllm_batch_batches", status="completed") == 2
    assert value(samples, "vllm_batch_batches", status="in_progress") == 0
    assert value(samples, "vllm_batch_batch_duration_seconds_count", status="completed") == 2
    assert value(samples, "vllm_batch_queue_wait_seconds_count") == 2
    assert value(samples, "vllm_batch_checkpoint_commit_seconds_count") >= 2
    assert value(samples, "vllm_batch_model_load_seconds_count", model="echo-model") == 1
    assert value(samples, "vllm_batch_model_switches_total") == 1  # echo-model, then echo-embed
    assert value(samples, "vllm_batch_engine_state", state="ready") == 1
    assert value(samples, "vllm_batch_loaded_model", model="echo-embed") == 1
    assert value(samples, "vllm_batch_checkpoint_lag_seconds") == 0
    assert value(samples, "vllm_batch_disk_free_bytes") > 0
    from vllm_batch_server import __version__

    assert value(samples, "vllm_batch_info", version=__version__, engine="echo") == 1

    # No label value names a batch, a file, a request or anything a user sent.
    user_values = {chat.id, embed.id, chat.input_file_id, "req-0", "message number 0", "e0", "text 0"}
    for series in samples.values():
        for labels in series:
            for _, label_value in labels:
                assert label_value not in user_values
                assert not re.match(r"(batch_|file-|evt_|wh_)", label_value), labels


def test_failed_requests_and_their_batch_are_counted(server_factory: ServerFactory) -> None:
    """A batch that expires: its unfinished requests get batch_expired lines, counted as failed."""
    server = server_factory(extra_args=["--echo-delay", "0.2", "--window", "1", "--sweep-seconds", "0.2"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(30), completion_window="2s").id, timeout=30)
    assert batch.status == "expired" and batch.request_counts.failed > 0
    time.sleep(1.1)
    samples = scrape(server)
    labels = {"model": "echo-model", "endpoint": "/v1/chat/completions"}
    assert value(samples, "vllm_batch_requests_total", **labels, outcome="failed") == batch.request_counts.failed
    assert value(samples, "vllm_batch_requests_total", **labels, outcome="succeeded") == (
        batch.request_counts.completed)
    assert value(samples, "vllm_batch_batch_duration_seconds_count", status="expired") == 1
    assert value(samples, "vllm_batch_batches", status="expired") == 1


def test_engine_restarts_and_resumes_after_kill_9_are_counted(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-fault", "crash-after=5,times=1", "--echo-delay", "0.01",
                                        "--window", "2", "--checkpoint-every", "5"])
    client = sdk(server)
    assert wait_for(client, submit(client, chat_lines(20)).id).status == "completed"
    assert value(scrape(server), "vllm_batch_engine_restarts_total") == 1

    slow = wait_for(client, submit(client, chat_lines(400, prefix="slow")).id,
                    until=lambda b: b.request_counts.completed >= 20)
    server.kill()
    server.start()
    samples = scrape(server)
    assert value(samples, "vllm_batch_resumed_batches_total") == 1
    assert wait_for(client, slow.id).status == "completed"


def test_checkpoint_lag_is_the_age_of_the_oldest_result_not_yet_durable(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.02", "--window", "2", "--checkpoint-every", "100000",
                                        "--checkpoint-seconds", "4"])
    client = sdk(server)
    batch = submit(client, chat_lines(2000))
    wait_for(client, batch.id, until=lambda b: b.status == "in_progress")
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        samples = scrape(server)
        seen.append((value(samples, "vllm_batch_checkpoint_lag_seconds"),
                     value(samples, "vllm_batch_uncommitted_results")))
        time.sleep(0.25)
    assert max(lag for lag, _ in seen) > 1.0, seen  # results wait up to 4 s for their checkpoint
    assert max(lag for lag, _ in seen) < 6.0, seen
    assert max(count for _, count in seen) > 10
    client.batches.cancel(batch.id)
    wait_for(client, batch.id)
    assert value(scrape(server), "vllm_batch_checkpoint_lag_seconds") == 0


def test_metrics_need_the_key_unless_public(server_factory: ServerFactory) -> None:
    private = server_factory("private", api_key=KEY)
    assert httpx.get(private.root_url + "/metrics").status_code == 401
    assert httpx.get(private.root_url + "/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
    scrape(private)

    public = server_factory("public", api_key=KEY, extra_args=["--metrics-public"])
    response = httpx.get(public.root_url + "/metrics")
    assert response.status_code == 200 and "vllm_batch_batches" in response.text
    assert httpx.get(public.base_url + "/batches").status_code == 401  # only /metrics was opened
    assert httpx.get(public.root_url + "/status").status_code == 401


def test_vllm_names_keep_their_colons_whatever_the_scraper_asks() -> None:
    """Regression: Prometheus asks for OpenMetrics first, and prometheus-client's OpenMetrics encoder turned
    `vllm:num_requests_running` into `vllm_num_requests_running`, so no dashboard query found vLLM's metrics."""
    gauge = Gauge("vllm:ops_test_requests", "A vLLM-style name, in the global registry as vLLM's are.",
                  ["model_name"])
    gauge.labels("m").set(3)

    class NoLive:
        def collect(self) -> Iterator[Any]:
            return iter(())

    try:
        body, content_type = metrics.render(NoLive())  # type: ignore[arg-type]
    finally:
        prometheus_client.REGISTRY.unregister(gauge)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {s.name: s for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples["vllm:ops_test_requests"].value == 3
    assert "vllm_ops_test_requests" not in samples


def test_prometheus_gets_the_text_format(shared_server: RunningServer) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    response = httpx.get(shared_server.root_url + "/metrics", headers={"accept": accept})
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"vllm_batch_requests", "vllm_batch_batches", "vllm_batch_checkpoint_commit_seconds"} <= names


def test_two_apps_in_one_process_have_their_own_metrics(tmp_path: Path) -> None:
    """One registry per app: two apps in one process neither collide registering their metrics nor see each
    other's numbers (here the model load that only the first one did, at start-up)."""
    from starlette.testclient import TestClient

    from vllm_batch_server.app import create_app
    from vllm_batch_server.settings import Settings

    def app(name: str, preload: bool) -> TestClient:
        return TestClient(create_app(Settings(engine="echo", models=["m"], data_dir=tmp_path / name,
                                              preload=preload)))

    def loads(client: TestClient) -> float:
        response = client.get("/metrics")
        assert response.status_code == 200
        return sum(sample.value for family in text_string_to_metric_families(response.text)
                   for sample in family.samples if sample.name == "vllm_batch_model_load_seconds_count")

    with app("first", preload=True) as first, app("second", preload=False) as second:
        assert loads(first) == 1
        assert loads(second) == 0
