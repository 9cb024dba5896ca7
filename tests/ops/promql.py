"""The queries the deploy/ folder ships (the Grafana dashboard and the alert rules), and the metric names each
one reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "vllm-batch.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# The DCGM exporter's names that the dashboard uses: fields of NVIDIA's etc/default-counters.csv.
DCGM_DEFAULT_COUNTERS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
                         "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_SM_CLOCK",
                         "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEM_COPY_UTIL"}

# What Grafana puts in place of its variables; "All" of a multi-value variable is the regex `.*`.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "5s", "$instance": ".*", "$gpu_instance": ".*"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def template_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        rules.extend(group["rules"])
    return rules


def concrete(expr: str) -> str:
    """The expression with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group(0) in _KEYWORDS:
            continue  # a function or an aggregation
        names.add(match.group(0))
    return names


def label_values_metric(definition: str) -> str:
    match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", definition)
    assert match, definition
    return match.group(1)
