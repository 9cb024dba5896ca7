"""Prometheus metrics of online traffic, by model and endpoint, kept apart from batch work.

Each instance registers its collectors into a registry of its own (or the one it is given), so two servers in one
process never clash; GET /metrics collects it with the server's other metrics (metrics.LiveCollector). Model
labels are limited to the served models: a caller cannot grow the label set by sending made-up names.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from a cached one-token answer on a GPU to a long generation on a CPU.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OTHER_MODEL = "other"


class OnlineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, models: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._models = frozenset(models)
        self.requests = Counter(
            "vllm_batch_online_requests", "Online requests answered, by model, endpoint and HTTP status "
            "(429: refused by admission; batch work is not counted here)",
            ["model", "endpoint", "status"], registry=self.registry)
        self.duration = Histogram(
            "vllm_batch_online_request_duration_seconds", "Online requests from arrival to the last byte "
            "(successful ones)", ["model", "endpoint"], buckets=_SECONDS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "vllm_batch_online_time_to_first_token_seconds", "Streamed online requests from arrival to the "
            "first event", ["model", "endpoint"], buckets=_SECONDS, registry=self.registry)
        self.in_flight = Gauge(
            "vllm_batch_online_requests_in_flight", "Online requests admitted and not yet answered",
            registry=self.registry)

    def model_label(self, model: object) -> str:
        return model if isinstance(model, str) and model in self._models else OTHER_MODEL

    def answered(self, model: object, endpoint: str, status: int, seconds: float | None) -> None:
        label = self.model_label(model)
        self.requests.labels(label, endpoint, str(status)).inc()
        if seconds is not None and status == 200:
            self.duration.labels(label, endpoint).observe(seconds)

    def first_token(self, model: object, endpoint: str, seconds: float) -> None:
        self.time_to_first_token.labels(self.model_label(model), endpoint).observe(seconds)
