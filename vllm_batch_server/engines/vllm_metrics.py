"""vLLM's own metrics (`vllm:*`) of every engine loaded in this process, for GET /metrics and /status.

vLLM registers its metrics in prometheus-client's global registry when an engine starts, after taking out
every `vllm:` collector already there (`unregister_vllm_metrics` in its Prometheus logger). With several
engines in one process (`--max-loaded-models`), only the one started last would be scraped, though the others
keep updating theirs. So each engine adopts the collectors it registered as it starts (loads happen one at a
time), gives them up as it stops, and they are collected here, merged family by family: their samples differ
by `model_name`. Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import Metric

_PREFIX = "vllm:"
_adopted: dict[int, list[Any]] = {}  # id(engine) -> the collectors it registered


def _registered() -> list[Any]:
    # The registry's own map of collectors (what vLLM's unregister_vllm_metrics walks too).
    return [collector for collector in list(prometheus_client.REGISTRY._collector_to_names)
            if str(getattr(collector, "_name", "")).startswith(_PREFIX)]


def adopt(engine: object) -> None:
    """Right after `engine` started: the `vllm:` collectors registered now are its own."""
    _adopted[id(engine)] = _registered()


def release(engine: object) -> None:
    _adopted.pop(id(engine), None)


def collectors() -> list[Any]:
    """The registered `vllm:` collectors and those of every engine still loaded, each once."""
    seen: dict[int, Any] = {id(c): c for c in _registered()}
    for owned in list(_adopted.values()):
        for collector in owned:
            seen.setdefault(id(collector), collector)
    return list(seen.values())


def collect(names: Iterable[str] | None = None) -> Iterator[Metric]:
    """vLLM's metric families (only `names`, if given), one family per name over every engine."""
    wanted = set(names) if names is not None else None
    families: dict[str, Metric] = {}
    samples_seen: dict[str, set[tuple[str, frozenset[tuple[str, str]]]]] = {}
    for collector in collectors():
        for metric in collector.collect():
            if wanted is not None and metric.name not in wanted:
                continue
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = Metric(metric.name, metric.documentation, metric.type,
                                                        metric.unit)
                samples_seen[metric.name] = set()
            seen = samples_seen[metric.name]
            for sample in metric.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                if key not in seen:
                    seen.add(key)
                    family.samples.append(sample)
    yield from families.values()


class Registry:
    """prometheus-client's global registry with its `vllm:` families replaced by every engine's, merged."""

    def collect(self) -> Iterator[Metric]:
        vllm = {id(c) for c in collectors()}
        for collector in list(prometheus_client.REGISTRY._collector_to_names):
            if id(collector) not in vllm:
                yield from collector.collect()
        yield from collect()
