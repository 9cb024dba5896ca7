"""`python -m benchmarks [NAME ...] [-- ARGS]`: run the suite (all benchmarks by default), one after another.

    python -m benchmarks                       # everything, default sizes (~30 min on 2 CPU cores)
    python -m benchmarks pipeline crash        # some of them
    python -m benchmarks throughput -- --model my-org/my-model --requests 1024 --dtype auto
    python -m benchmarks --list

ARGS after `--` go to every benchmark named (so name one when passing its own flags). Each benchmark is also
runnable alone: `python -m benchmarks.NAME --help`. A failing benchmark does not stop the others; the exit
status is non-zero if any failed.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from typing import Any

from benchmarks._harness import print_table, say, write_results

# In the order they run: the quick echo-engine ones first, the real-engine comparison last (scale's default
# parts use echo backends only).
BENCHMARKS = {
    "grouping_speed": "prefix grouping's cost per request on seven input shapes (no engine)",
    "pipeline": "echo engine, 50,000 lines: requests/s end to end, checkpointing on vs off, vs a bare loop",
    "memory": "server RSS through a 1 GB upload/download and a 50,000-line batch; client RSS (client_memory)",
    "crash": "kill -9 at random points: results recomputed, time from restart to resumed processing",
    "dashboard": "10,000 batches: queue page load in Chromium, status-call p99 with dashboards open",
    "big_batch": "echo engine, 1M and 10M lines, kill -9 resume at 10M: peak RSS and req/s side by side (~40 min)",
    "throughput": "real vLLM: offline LLM vs run_batch vs our server: documents, a queue of files, 4 workloads",
    "scale": "echo backends: throughput against 1-8 backends, cost of losing one (real vLLM: --parts affinity)",
    "online": "real vLLM: online latency idle and beside a batch: the controller, priority only, a fixed window",
}


def targets_of(name: str, payload: dict[str, Any]) -> list[list[Any]]:
    """The suite's summary lines: one per target a benchmark checks."""
    t = payload.get("targets", {})
    if name == "grouping_speed":
        return [["grouping_speed", "prefix grouping ≤ 2 µs per request, every shape",
                 f"max {payload['max_grouping_us']:.2f} µs", t.get("met")]]
    if name == "pipeline":
        on = payload["results"]["checkpointing on"]
        return [["pipeline", "echo end to end ≥ 5,000 req/s", f"{on['rps']:,.0f} req/s", t.get("rps_met")],
                ["pipeline", "checkpointing costs ≤ 3%", f"{payload['checkpointing_cost'] * 100:+.1f}% wall",
                 t.get("checkpoint_cost_met")]]
    if name == "memory":
        rows = [["memory", "server RSS growth < 100 MB", f"{payload['max_growth_mb']:.1f} MB", t.get("server_met")]]
        client = (payload.get("client") or {}).get("results") or {}
        if client.get("phases"):
            added = client["phases"][0]
            rows.append(["memory", "client RSS growth < 50 MB adding 1M requests",
                         f"{added.get('peak_growth_mb')} MB", client.get("add_within_target")])
        return rows
    if name == "crash":
        return [["crash", "recomputed ≤ one checkpoint interval", "see table", t.get("within_one_interval")],
                ["crash", "exactly one result per request after kills", "", t.get("exactly_once")]]
    if name == "dashboard":
        load = payload["page_load_s"]["queue"]
        return [["dashboard", "queue page load < 1 s (10,000 batches)", f"{load['max']:.2f} s max",
                 t.get("load_met")],
                ["dashboard", "status p99 < 50 ms with the page open", f"{t.get('worst_p99_ms_with_page')} ms",
                 t.get("p99_met")]]
    if name == "big_batch":
        peak = t.get("max_peak_rss_mib")
        ratio = t.get("rps_ratio")
        return [["big_batch", "peak RSS ≤ 300 MiB at the largest size and its kill -9 resume",
                 f"{peak:.0f} MiB" if peak is not None else "-", t.get("rss_met")],
                ["big_batch", "req/s at the largest size ≥ 0.8 × at the smallest",
                 f"{ratio:.2f}" if ratio is not None else "-", t.get("rps_met")],
                ["big_batch", "every custom_id exactly once", "", t.get("exactly_once")]]
    if name == "throughput":
        rows = []
        goals, met = t.get("goals", {}), t.get("met", {})
        for workload, ratios in payload.get("ratios", {}).items():
            for key, goal in goals.get(workload, {}).items():
                if key in ratios:
                    rows.append(["throughput", f"{workload} {key} ≥ {goal}", f"{ratios[key]:.3f}",
                                 met.get(workload, {}).get(key)])
        return rows
    if name == "scale":
        rows = []
        for result in (payload.get("scaling") or {}).get("results", []):
            rows.append(["scale", f"{result['backends']} backends ≥ 0.9 × linear", f"{result['vs_linear']:.3f}",
                         result["vs_linear"] >= 0.9])
        loss = payload.get("loss")
        if loss:
            rows.append(["scale", "losing a backend recomputes ≤ its window",
                         f"{loss['recomputed']} of {loss['window']}", loss["met"]])
        affinity = payload.get("affinity")
        if affinity:
            rows.append(["scale", "prefix affinity: more prompt tokens cached", f"+{affinity['cached_gain']:.1%}, "
                         f"{affinity['speedup']:.2f}× faster", affinity["cached_gain"] > 0])
        return rows
    if name == "online":
        rows = []
        for policy, ratios in payload.get("ratios", {}).items():
            met = t.get(policy, {})
            share = f"online {ratios.get('online_request_share', 0):.1%} of requests"
            rows.append(["online", f"{policy}: e2e p50 beside a batch ≤ 2 × idle, online ≤ 10%",
                         f"{ratios.get('e2e_p50_shared_over_idle') or 0:.2f} × ({share})", met.get("latency_met")])
            if "batch_kept" in ratios:
                rows.append(["online", f"{policy}: batch keeps ≥ 75% with online ≤ 10%",
                             f"{ratios['batch_kept']:.1%} ({share})", met.get("batch_kept_met")])
        return rows
    return []


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        names, extra = argv[:split], argv[split + 1:]
    else:
        names, extra = argv, []
    if names in (["--list"], ["-l"]):
        for name, what in BENCHMARKS.items():
            print(f"{name:12} {what}")
        return 0
    if names in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    selected = names or list(BENCHMARKS)

    summary: list[list[Any]] = []
    failed: list[str] = []
    began = time.perf_counter()
    for name in selected:
        say(f"=== {name}: {BENCHMARKS[name]}")
        started = time.perf_counter()
        try:
            payload = importlib.import_module(f"benchmarks.{name}").main(list(extra))
            summary += targets_of(name, payload)
        except SystemExit as exc:  # argparse refusing the flags
            if exc.code:
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        say(f"=== {name} took {time.perf_counter() - started:.0f} s")

    rows = [[bench, target, value, "yes" if met else ("NO" if met is False else "-")]
            for bench, target, value, met in summary]
    print_table(f"Targets ({time.perf_counter() - began:.0f} s in all)", ["benchmark", "target", "measured", "met"],
                rows)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    if "--no-json" not in extra:
        write_results("suite", {"benchmarks": selected, "failed": failed, "targets": summary})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
