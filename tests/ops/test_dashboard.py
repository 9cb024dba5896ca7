"""Every query the dashboard and the alert rules ship names a metric that the server (ours, or vLLM's own in
the same scrape) or NVIDIA's DCGM exporter exports. Prometheus evaluating them is in test_prometheus.py."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest

from tests.conftest import Server, chat_lines, sdk, submit, wait_for
from tests.ops.promql import (
    DCGM_DEFAULT_COUNTERS,
    alert_rules,
    dashboard_queries,
    label_values_metric,
    metric_names,
    template_queries,
)
from tests.ops.test_metrics import scrape


def vllm_declared_metrics() -> set[str] | None:
    """The sample names vLLM's Prometheus logger declares, read from the installed vLLM's source (importing
    it takes seconds; its engine, minutes: tests/vllm/test_metrics.py checks a live scrape)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = (Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py").read_text()
    names = set()
    for kind, name in re.findall(r"_(counter|gauge|histogram)_cls\(\s*name=\"(vllm:[\w:]+)\"", source):
        names |= {"counter": {name + "_total"}, "gauge": {name},
                  "histogram": {name + "_bucket", name + "_sum", name + "_count"}}[kind]
    return names


def all_queries() -> list[tuple[str, str]]:
    return [*dashboard_queries(), *(("alert " + r["alert"], r["expr"]) for r in alert_rules()),
            *(("variable", f"{label_values_metric(d)}") for d in template_queries())]


def test_the_name_extraction_itself() -> None:
    assert metric_names('sum by (model, outcome) (rate(vllm_batch_requests_total{instance=~"$instance", '
                        'outcome="failed"}[$__rate_interval]))') == {"vllm_batch_requests_total"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[1h]))) / clamp_min(b, 1e-9) "
                        "or vector(0)") == {"a_bucket", "b"}
    assert metric_names("max(vllm:kv_cache_usage_perc) > 0 and on (instance) up == 1") == {
        "vllm:kv_cache_usage_perc", "up"}


def test_the_dashboard_covers_what_operators_asked_for() -> None:
    names = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for wanted in ("vllm_batch_batches", "vllm_batch_requests_total", "vllm_batch_completion_tokens_total",
                   "vllm:prefix_cache_hits_total", "vllm:kv_cache_usage_perc", "vllm_batch_checkpoint_lag_seconds",
                   "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"):
        assert wanted in names, wanted


def test_every_query_names_an_exported_metric(shared_server: Server) -> None:
    client = sdk(shared_server)
    wait_for(client, submit(client, chat_lines(3)).id)  # so that every labelled family has a series
    time.sleep(1.1)  # the numbers read from SQLite are at most a second old
    ours = set(scrape(shared_server)) | {"up"}  # `up` is Prometheus's own, for every target
    for where, expr in all_queries():
        names = metric_names(expr)
        assert names, (where, expr)
        for name in names:
            if name.startswith("DCGM_"):
                assert name in DCGM_DEFAULT_COUNTERS, (where, name)
            elif not name.startswith("vllm:"):
                assert name in ours, (where, name)


@pytest.mark.vllm  # imports vLLM's metrics module, so it runs where vLLM is installed
def test_every_vllm_name_is_one_vllm_declares() -> None:
    vllm = vllm_declared_metrics()
    if vllm is None:
        pytest.skip("vLLM is not installed: its metric names cannot be checked (tests/vllm/test_metrics.py "
                    "checks them on a live scrape)")
    used = {(where, name) for where, expr in all_queries() for name in metric_names(expr) if name.startswith("vllm:")}
    assert used
    assert {name for _, name in used} <= vllm, sorted(name for _, name in used if name not in vllm)
