"""Prometheus metrics: ours (prefixed `vllm_batch_`) and vLLM's own (`vllm:*`), in one scrape of GET /metrics.

Where each number comes from, so that none costs the request path anything:

- Requests, tokens and batches by status are read from SQLite when scraped (monitor.py): they are the
  committed progress every checkpoint already records, so they survive restarts and never count a result a
  crash took back.
- Batch durations come from the lifecycle's event log, through a reader with its own cursor ("metrics"), like
  every other consumer of batch events; nothing here hooks into the scheduler for them.
- The engine's loads, switches and restarts, a batch's wait before its first run and checkpoint commit times
  are reported as they happen through the scheduler's observer (`SchedulerMetrics`, a scheduler.Observer; the
  commit times come from each batch's checkpoint thread through a callback): the queue never imports this
  module.
- Ours live in one registry per app (`Metrics`), so two apps in one process never share or clash.
- Gauges of live state (engine state, paused batches, checkpoint lag, disk) read the scheduler when scraped.
- Online requests are counted as they are answered, by model and endpoint (online_metrics.py), in the
  scheduler's own registry, collected with the live gauges.
- vLLM registers its metrics in prometheus-client's global registry from inside the engine (`AsyncLLM` with
  stats on, vLLM's default); they are appended to ours as they are, every loaded engine's
  (engines/vllm_metrics.py: a new engine takes the previous one's out of the registry).

No label carries a batch id, a file name or anything a user sent: labels are model names (as configured),
endpoints, statuses and outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vllm_batch_server import __version__
from vllm_batch_server.engines import base as engine_base
from vllm_batch_server.engines import vllm_metrics
from vllm_batch_server.engines.router.metrics import member_metrics
from vllm_batch_server.exhaustion import Exhausted
from vllm_batch_server.queue.engine_owner import EngineState
from vllm_batch_server.statuses import TERMINAL, BatchStatus, event_type

if TYPE_CHECKING:
    from vllm_batch_server.observers.monitor import Monitor
    from vllm_batch_server.queue.scheduler import Scheduler
    from vllm_batch_server.settings import Settings
    from vllm_batch_server.store.database import BatchRow, Database
    from vllm_batch_server.store.events import EventLog

log = logging.getLogger(__name__)

PREFIX = "vllm_batch_"
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus reads

_MINUTES = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400, 172800)


class Metrics:
    """Ours, observed as things happen, in a registry of this app's own: two apps in one process (tests, a
    program that embeds the server) never share a series nor collide registering one."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.checkpoint_commit_seconds = Histogram(
            PREFIX + "checkpoint_commit_seconds", "Time to make one checkpoint durable: fsync the result parts "
            "that grew, then commit their offsets and counters to SQLite.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry)
        self.queue_wait_seconds = Histogram(
            PREFIX + "queue_wait_seconds", "From a batch's creation to the start of its first run (validation "
            "included).", buckets=_MINUTES, registry=registry)
        self.batch_duration_seconds = Histogram(
            PREFIX + "batch_duration_seconds", "From a batch's creation to its terminal status, by that status.",
            ["status"], buckets=_MINUTES, registry=registry)
        self.model_load_seconds = Histogram(
            PREFIX + "model_load_seconds", "Time to (re)start the engine with a model, by model.", ["model"],
            buckets=(0.1, 1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200), registry=registry)
        self.model_switches = Counter(PREFIX + "model_switches", "Engine restarts to serve a different model.",
                                      registry=registry)
        self.model_sleeps = Counter(PREFIX + "model_sleeps", "Idle engines put to sleep (vLLM's sleep mode) to "
                                    "make room for another model, by model.", ["model"], registry=registry)
        self.model_wake_seconds = Histogram(
            PREFIX + "model_wake_seconds", "Time to wake a sleeping engine, by model.", ["model"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120), registry=registry)
        self.engine_restarts = Counter(PREFIX + "engine_restarts", "Engine restarts after it failed (died, hung "
                                       "or failed a health check).", registry=registry)
        self.resumed_batches = Counter(PREFIX + "resumed_batches", "Batches that resumed from their last "
                                       "checkpoint when the server started (they had been stopped mid-run).",
                                       registry=registry)
        self.webhook_attempts = Counter(PREFIX + "webhook_attempts", "Webhook delivery attempts, by result "
                                        "(success: a 2xx answer).", ["result"], registry=registry)
        self.webhook_deliveries = Counter(PREFIX + "webhook_deliveries", "Webhook deliveries that ended: "
                                          "delivered, or failed once their retry time ran out.", ["status"],
                                          registry=registry)
        for result in ("success", "failure"):
            self.webhook_attempts.labels(result)
        for status in ("delivered", "failed"):
            self.webhook_deliveries.labels(status)
        for ending in TERMINAL:  # every series exists from the start, so a query for one never comes back empty
            self.batch_duration_seconds.labels(ending.value)


class SchedulerMetrics:
    """What the scheduler and its engine owner report (scheduler.Observer), as metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        self._metrics.model_load_seconds.labels(model).observe(seconds)
        if switched:
            self._metrics.model_switches.inc()
        if restarted:
            self._metrics.engine_restarts.inc()

    def model_slept(self, model: str) -> None:
        self._metrics.model_sleeps.labels(model).inc()

    def model_woken(self, model: str, seconds: float) -> None:
        self._metrics.model_wake_seconds.labels(model).observe(seconds)

    def batch_started(self, batch: BatchRow) -> None:
        self._metrics.queue_wait_seconds.observe(max(0.0, time.time() - batch.created_at))

    def checkpoint_committed(self, seconds: float) -> None:
        # On a batch's checkpoint thread: prometheus-client's metrics are thread-safe.
        self._metrics.checkpoint_commit_seconds.observe(seconds)


class LifecycleMetrics:
    """Batch durations, from the event log through the "metrics" reader. A crash between observing and the ack
    observes those events again after the restart (histograms start afresh then anyway)."""

    READER = "metrics"
    _ENDINGS: ClassVar[dict[str, BatchStatus]] = {event_type(status): status for status in TERMINAL}

    def __init__(self, db: Database, events: EventLog, metrics: Metrics | None = None) -> None:
        self._db = db
        self._durations = (metrics or Metrics()).batch_duration_seconds
        self._reader = events.reader(self.READER, start="end")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._reader.position()  # placed now, before the scheduler ends any batch
        self._task = asyncio.create_task(self._follow(), name="lifecycle metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            try:
                events = await self._reader.next(timeout=30)
                for event in events:
                    status = self._ENDINGS.get(event.type)
                    if status is None:
                        continue
                    batch = await self._db.get_batch(event.batch_id)
                    if batch is not None:
                        self._durations.labels(status.value).observe(
                            max(0, event.created_at - batch.created_at))
                if events:
                    await self._reader.ack(events[-1])
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk, say: keep the cursor and try again
                log.exception("lifecycle metrics: could not read the event log; retrying")
                await asyncio.sleep(5)


async def count_resumed(db: Database, metrics: Metrics) -> None:
    """At start-up, before the scheduler runs anything: the batches about to resume from a checkpoint."""
    metrics.resumed_batches.inc(await db.resumable_batches())


def vllm_kv_cache_usage(model: str | None = None) -> float | None:
    """vLLM's KV-cache usage (0-1) from its own gauge (of `model`'s engine, if given), or None when no vLLM
    engine has reported one."""
    values = [sample.value for metric in vllm_metrics.collect(["vllm:kv_cache_usage_perc"])
              for sample in metric.samples if model is None or sample.labels.get("model_name") == model]
    return max(values) if values else None


class LiveCollector:
    """This app's metrics: first those observed as things happen (its `Metrics`), then gauges and counters read
    when scraped, from the monitor's snapshot of SQLite and from the scheduler."""

    def __init__(self, monitor: Monitor, scheduler: Scheduler, settings: Settings, metrics: Metrics) -> None:
        self._monitor = monitor
        self._scheduler = scheduler
        self._settings = settings
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.registry.collect()
        snapshot = self._monitor.latest
        info = GaugeMetricFamily(PREFIX + "info", "The server's version and engine kind.",
                                 labels=["version", "engine"])
        info.add_metric([__version__, self._settings.engine], 1)
        yield info

        batches = GaugeMetricFamily(PREFIX + "batches", "Batches by status.", labels=["status"])
        for status in BatchStatus:
            batches.add_metric([status.value], snapshot.batch_counts.get(status.value, 0))
        yield batches

        requests = CounterMetricFamily(PREFIX + "requests", "Requests with a committed result, by model, endpoint "
                                       "and outcome (succeeded: status 200, in the output file; failed: in the "
                                       "error file).", labels=["model", "endpoint", "outcome"])
        prompt = CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens of committed results.",
                                     labels=["model", "endpoint"])
        cached = CounterMetricFamily(PREFIX + "cached_tokens", "Prompt tokens served from the prefix cache.",
                                     labels=["model", "endpoint"])
        completion = CounterMetricFamily(PREFIX + "completion_tokens", "Completion tokens of committed results.",
                                         labels=["model", "endpoint"])
        for total in snapshot.totals:
            labels = [total.model, total.endpoint]
            requests.add_metric([*labels, "succeeded"], total.completed)
            requests.add_metric([*labels, "failed"], total.failed)
            prompt.add_metric(labels, total.input_tokens)
            cached.add_metric(labels, total.cached_tokens)
            completion.add_metric(labels, total.output_tokens)
        yield from (requests, prompt, cached, completion)

        scheduler = self._scheduler
        owner = scheduler.engine_owner
        state = GaugeMetricFamily(PREFIX + "engine_state", "1 for the engine's current state (with several "
                                  "models loaded: the engine used last, or loading).", labels=["state"])
        for candidate in EngineState:
            state.add_metric([candidate.value], 1 if owner.state is candidate else 0)
        yield state
        slots = owner.slots
        loaded = GaugeMetricFamily(PREFIX + "loaded_model", "1 for each model an engine has loaded and ready.",
                                   labels=["model"])
        for slot in slots:
            if slot.state is EngineState.READY and slot.engine.model is not None:
                loaded.add_metric([slot.engine.model], 1)
        yield loaded
        models = GaugeMetricFamily(PREFIX + "model_state", "1 for each model an engine holds, by its state "
                                   "(loading, ready, failed, asleep).", labels=["model", "state"])
        for slot in slots:
            model = slot.loading_model if slot.state is EngineState.LOADING else slot.model
            if model is not None:
                models.add_metric([model, slot.state.value], 1)
        yield models
        yield GaugeMetricFamily(PREFIX + "max_loaded_models", "Models that may be loaded side by side "
                                "(--max-loaded-models).", value=owner.max_loaded)

        paused = GaugeMetricFamily(PREFIX + "paused_batches", "Batches paused until a resource of ours comes back, "
                                   "by what ran out.", labels=["reason"])
        reasons = {kind.value: 0 for kind in Exhausted}  # every reason, so a query always finds a series
        for pause in list(scheduler.paused.values()):
            reasons[pause.reason.value] += 1
        for reason, count in reasons.items():
            paused.add_metric([reason], count)
        yield paused

        lag, uncommitted = checkpoint_lag(scheduler)
        yield GaugeMetricFamily(PREFIX + "checkpoint_lag_seconds", "Age of the oldest result not yet durable, over "
                                "the running batches: the work a kill -9 now would redo.", value=lag)
        yield GaugeMetricFamily(PREFIX + "uncommitted_results", "Results computed but not yet durable, over the "
                                "running batches.", value=uncommitted)
        yield GaugeMetricFamily(PREFIX + "running_batches", "Batches with a runner feeding the engine.",
                                value=len(scheduler.runners))
        yield from member_metrics(scheduler.engine)  # a router's backends and replicas; nothing for one engine
        yield CounterMetricFamily(PREFIX + "odd_usage_fields", "Usage counts an engine or backend answered that "
                                  "were not non-negative whole numbers (NaN, strings, negatives, null), each "
                                  "counted as 0 for its result (process-wide).", value=engine_base.odd_usage_fields)
        yield GaugeMetricFamily(PREFIX + "webhook_pending_deliveries", "Webhook deliveries waiting for their "
                                "next attempt.", value=snapshot.pending_deliveries)
        # Online requests (api/online.py), counted as they are answered, apart from batch work.
        yield from scheduler.online.metrics.registry.collect()
        try:
            usage = shutil.disk_usage(self._settings.data_dir)
        except OSError:
            return
        yield GaugeMetricFamily(PREFIX + "disk_free_bytes", "Free space on the data directory's filesystem.",
                                value=usage.free)
        yield GaugeMetricFamily(PREFIX + "disk_total_bytes", "Size of the data directory's filesystem.",
                                value=usage.total)


def checkpoint_lag(scheduler: Scheduler) -> tuple[float, int]:
    """The largest lag and the sum of not yet durable results over the running batches."""
    lag, uncommitted = 0.0, 0
    for runner in list(scheduler.runners.values()):
        results = runner.results
        if results is None:
            continue
        seconds, count = results.lag()
        lag = max(lag, seconds)
        uncommitted += count
    return lag, uncommitted


class _Combined:
    """Several collectors seen as one registry by the encoders: the app's first, then the process's global one
    (vLLM's metrics, and prometheus-client's process and Python collectors)."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self._collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def render(live: LiveCollector) -> tuple[bytes, str]:
    """The exposition in Prometheus's text format 0.0.4, whatever the scraper prefers. Not OpenMetrics, which
    Prometheus asks for first: prometheus-client 0.26 writes vLLM's sample names there with their colons
    turned into underscores (`vllm_num_requests_running`) under TYPE lines that keep them, so Prometheus
    would store none of vLLM's metrics under the names vLLM documents (seen with the real engine)."""
    return generate_latest(_Combined([live, vllm_metrics.Registry()])), TEXT_FORMAT
