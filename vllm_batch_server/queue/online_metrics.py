"""Prometheus metrics of online traffic, by model and endpoint, kept apart from batch work.

Each instance registers its collectors into a registry of its own (or the one it is given), so two servers in one
process never clash; GET /metrics collects it with the server's other metrics (metrics.LiveCollector). Model
labels are limited to the served models: a caller cannot grow the label set by sending made-up names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_batch_server.queue.online_control import LatencyController

# Latency buckets from a cached one-token answer on a GPU to a long generation on a CPU.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OTHER_MODEL = "other"
DECISIONS = ("narrow", "widen", "futile", "probe")


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
        # The latency controller (online_control.py) and the batch window it sets.
        self.batch_window = Gauge(
            "vllm_batch_online_batch_window", "Batch requests allowed in the engine now: the full window unless "
            "online requests are being answered (or were within the hold), when the controller's window applies",
            registry=self.registry)
        self.batch_window_full = Gauge(
            "vllm_batch_online_batch_window_full", "Batch requests in the engine when nothing narrows them (the "
            "runner's window)", registry=self.registry)
        self.controller_window = Gauge(
            "vllm_batch_online_controller_window", "The window applied while online requests are answered: what "
            "the controller learned (the full window when open, 0 while it measures the idle latency), "
            "--online-batch-window when set", registry=self.registry)
        self.latency_target = Gauge(
            "vllm_batch_online_latency_target", "--online-latency-target: online time per token beside batch work "
            "over idle, at most (0: the controller is off)", registry=self.registry)
        self.latency_ratio = Gauge(
            "vllm_batch_online_latency_ratio", "Online time per token beside batch work over the idle baseline: "
            "the median of the latest answers (NaN until measured)", registry=self.registry)
        self.idle_latency = Gauge(
            "vllm_batch_online_idle_seconds_per_token", "The idle baseline: seconds per output token (per request "
            "where none are generated) of online answers with no batch work in the engine",
            ["model", "endpoint"], registry=self.registry)
        self.window_changes = Counter(
            "vllm_batch_online_window_changes", "The controller's decisions: narrow, widen, futile (narrowing "
            "did not lower the latency: back to where it began), probe (batch work paused to measure the idle "
            "latency)", ["decision"], registry=self.registry)
        self._decisions_seen = {decision: 0 for decision in DECISIONS}
        for decision in DECISIONS:
            self.window_changes.labels(decision)

    def watch_control(self, *, window: Callable[[], float], full: Callable[[], float],
                      controller_window: Callable[[], float], target: float,
                      ratio: Callable[[], float | None]) -> None:
        """Read the controller's state at each scrape."""
        self.batch_window.set_function(window)
        self.batch_window_full.set_function(full)
        self.controller_window.set_function(controller_window)
        self.latency_target.set(target)
        self.latency_ratio.set_function(lambda: math.nan if (value := ratio()) is None else value)

    def controlled(self, control: LatencyController) -> None:
        """After the controller took a measurement: its baselines and decisions."""
        for (model, endpoint), seconds in control.baselines().items():
            self.idle_latency.labels(self.model_label(model), endpoint).set(seconds)
        for decision in DECISIONS:
            new = control.changes[decision] - self._decisions_seen[decision]
            if new > 0:
                self.window_changes.labels(decision).inc(new)
                self._decisions_seen[decision] += new

    def model_label(self, model: object) -> str:
        return model if isinstance(model, str) and model in self._models else OTHER_MODEL

    def answered(self, model: object, endpoint: str, status: int, seconds: float | None) -> None:
        label = self.model_label(model)
        self.requests.labels(label, endpoint, str(status)).inc()
        if seconds is not None and status == 200:
            self.duration.labels(label, endpoint).observe(seconds)

    def first_token(self, model: object, endpoint: str, seconds: float) -> None:
        self.time_to_first_token.labels(self.model_label(model), endpoint).observe(seconds)
