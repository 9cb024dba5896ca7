"""A real Prometheus (Debian's `prometheus` package) scrapes a running server, through its API key, and every
query of the Grafana dashboard and every alert rule evaluates on what it scraped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, chat_lines, request_line, sdk, submit, wait_for
from tests.helpers.prometheus import Prometheus
from tests.ops.promql import (
    ALERTS,
    alert_rules,
    concrete,
    dashboard_queries,
    label_values_metric,
    metric_names,
    template_queries,
)

KEY = "sk-prometheus-test"


def test_prometheus_scrapes_the_server_and_every_dashboard_query_resolves(server_factory: ServerFactory,
                                                                         tmp_path: Path) -> None:
    server = server_factory(api_key=KEY)
    client = sdk(server)
    chat = wait_for(client, submit(client, chat_lines(5)).id)
    embed_lines = [request_line(f"e{i}", f"text {i}", model="echo-embed", url="/v1/embeddings") for i in range(3)]
    wait_for(client, submit(client, embed_lines, endpoint="/v1/embeddings").id)

    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.port}", api_key=KEY,
                            rule_files=[ALERTS]).start()
    try:
        target = prometheus.wait_for_target()
        assert target["scrapeUrl"].endswith("/metrics") and target["lastError"] == ""
        succeeded = prometheus.query('vllm_batch_requests_total{model="echo-model", outcome="succeeded"}')
        assert [float(s["value"][1]) for s in succeeded] == [chat.request_counts.completed]
        assert prometheus.query('vllm_batch_batches{status="completed"}')[0]["value"][1] == "2"

        for title, expr in dashboard_queries():
            result = prometheus.query(concrete(expr))  # raises unless Prometheus accepted and evaluated it
            names = metric_names(expr)
            if not any(n.startswith(("vllm:", "DCGM_")) for n in names):
                # Ours are all there after one batch: the query finds series (vLLM's need the real engine,
                # tests/vllm/test_metrics.py; the GPU row needs a DCGM exporter).
                assert result, (title, expr)
        for definition in template_queries():
            metric = label_values_metric(definition)
            values = prometheus.api("label/instance/values", **{"match[]": metric})
            assert values or metric.startswith("DCGM_"), definition

        for rule in alert_rules():
            prometheus.query(rule["expr"])
        deadline = time.monotonic() + 30
        while True:
            groups = prometheus.api("rules")["groups"]
            loaded = [rule for group in groups for rule in group["rules"]]
            if len(loaded) == len(alert_rules()) and all(r.get("lastEvaluation", "").startswith("2") and
                                                          not r["lastEvaluation"].startswith("0001")
                                                          for r in loaded):
                break
            assert time.monotonic() < deadline, groups
            time.sleep(0.5)
        assert all(rule["health"] == "ok" for rule in loaded), loaded
        firing = [r["name"] for r in loaded if r["state"] != "inactive"]
        assert firing == [], firing  # a healthy, idle server raises no alert
    finally:
        prometheus.stop()


def test_prometheus_is_refused_without_the_key(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(api_key=KEY)
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.port}").start()
    try:
        deadline = time.monotonic() + 30
        while True:
            targets = prometheus.api("targets")["activeTargets"]
            if targets and targets[0]["health"] == "down":
                assert "401" in targets[0]["lastError"]
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.5)
    finally:
        prometheus.stop()


@pytest.mark.parametrize("name", [r["alert"] for r in alert_rules()])
def test_every_alert_is_documented(name: str) -> None:
    assert name in (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
