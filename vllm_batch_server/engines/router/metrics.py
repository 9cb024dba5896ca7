"""The router's members in GET /metrics: which backends and replicas are in rotation, their windows and what
they have done, read from the router when scraped (nothing is counted on the request path for it).

Labels are the member's name (the `name=` given with `--backend`, else its URL, which can hold no credentials;
`replica-N`; or `in-process`) and its kind (`local`, `http`, `ray`): configuration, never anything a user sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "vllm_batch_"  # observers/metrics.PREFIX, not imported: the engines know nothing above them
LABELS = ["member", "kind"]


def member_metrics(engine: Any) -> Iterator[Metric]:
    """Families for each member of `engine` if it is a router (it has `snapshot()`); none for one engine."""
    snapshot = getattr(engine, "snapshot", None)
    if snapshot is None:
        return
    members: list[dict[str, Any]] = snapshot()
    up = GaugeMetricFamily(PREFIX + "router_member_up", "1 while a backend or replica is in rotation, 0 while it "
                           "is out (dead, hung, refusing us) or not started.", labels=LABELS)
    window = GaugeMetricFamily(PREFIX + "router_member_window", "Most requests the router keeps in flight on the "
                               "member now (adapts to its latency and errors).", labels=LABELS)
    in_flight = GaugeMetricFamily(PREFIX + "router_member_in_flight", "Requests in flight on the member.",
                                  labels=LABELS)
    completed = CounterMetricFamily(PREFIX + "router_member_requests", "Requests the member answered (any "
                                    "status; a result counts only once committed: see vllm_batch_requests).",
                                    labels=LABELS)
    failed = CounterMetricFamily(PREFIX + "router_member_failed_attempts", "Attempts that failed on the member "
                                 "(connection lost, timeout, 5xx) and were tried again.", labels=LABELS)
    moved = CounterMetricFamily(PREFIX + "router_member_moved_requests", "In-flight requests moved to other "
                                "members when this one was taken out of rotation: the work its loss cost.",
                                labels=LABELS)
    bad = CounterMetricFamily(PREFIX + "router_member_bad_answers", "Attempts the member answered 200 with "
                              "something that is no answer of the endpoint (not JSON, an error object, the wrong "
                              "shape): tried elsewhere, never committed as a success.", labels=LABELS)
    taken_out = CounterMetricFamily(PREFIX + "router_member_taken_out", "Times the member was taken out of "
                                    "rotation.", labels=LABELS)
    for member in members:
        labels = [str(member["name"]), str(member["kind"])]
        up.add_metric(labels, 1 if member["state"] == "up" else 0)
        window.add_metric(labels, member["window"])
        in_flight.add_metric(labels, member["in_flight"])
        completed.add_metric(labels, member["completed"])
        failed.add_metric(labels, member["failed_attempts"])
        moved.add_metric(labels, member["moved"])
        taken_out.add_metric(labels, member["taken_out"])
        bad.add_metric(labels, member["bad_answers"])
    yield from (up, window, in_flight, completed, failed, moved, taken_out, bad)
