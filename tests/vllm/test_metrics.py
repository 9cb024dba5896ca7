"""Metrics with the real engine: vLLM's own `vllm:*` metrics come in the same scrape as ours, /status reads the
KV-cache use, and a real Prometheus scraping the server resolves every dashboard query but the GPU ones (no
DCGM exporter here) to data."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers.prometheus import Prometheus
from tests.ops.promql import concrete, dashboard_queries, metric_names
from tests.ops.test_metrics import scrape, value
from tests.vllm.conftest import CHAT_MODEL, EMBED_MODEL, BackToBack

pytestmark = pytest.mark.vllm


def test_vllm_metrics_come_in_the_same_scrape(back_to_back: BackToBack) -> None:
    samples = scrape(back_to_back.server)
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    missing = {name for name in used if name.startswith("vllm:") and name not in samples}
    assert missing == set(), missing
    assert value(samples, "vllm_batch_model_load_seconds_count", model=CHAT_MODEL) >= 1
    assert value(samples, "vllm_batch_model_load_seconds_count", model=EMBED_MODEL) >= 1
    assert value(samples, "vllm_batch_model_switches_total") >= 1
    chat = {"model": CHAT_MODEL, "endpoint": "/v1/chat/completions"}
    assert value(samples, "vllm_batch_completion_tokens_total", **chat) >= back_to_back.chat.usage.output_tokens


def test_status_reads_the_kv_cache_use(back_to_back: BackToBack) -> None:
    status = httpx.get(back_to_back.server.root_url + "/status", timeout=10).json()
    engine = status["engine"]
    assert engine["kind"] == "vllm" and engine["state"] == "ready" and engine["model"] in (CHAT_MODEL, EMBED_MODEL)
    assert isinstance(engine["kv_cache_usage"], float) and 0.0 <= engine["kv_cache_usage"] <= 1.0
    assert httpx.get(back_to_back.server.root_url + "/ready", timeout=10).json() == {"ready": True, "reasons": []}


def test_prometheus_resolves_every_dashboard_query(back_to_back: BackToBack, tmp_path: Path) -> None:
    server = back_to_back.server
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.port}").start()
    try:
        prometheus.wait_for_target()
        for title, expr in dashboard_queries():
            result = prometheus.query(concrete(expr))
            if not any(name.startswith("DCGM_") for name in metric_names(expr)):
                assert result, (title, expr)
    finally:
        prometheus.stop()
