"""Load: many concurrent clients upload, poll and list while a batch runs; how fast do status calls answer?

Each client has its own connection and loops for the whole measurement: mostly `GET /v1/batches/{id}` (the
call every SDK's wait loop makes), plus listing batches and files and uploading small files. Any non-2xx
answer, transport error or "database is locked" anywhere counts as an error: the target is zero.

    python -m benchmarks.load_status [--clients 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks._harness import Server, common_args, print_table, say, workdir, write_results

# What a client does each turn, and how often.
MIX = {"status": 0.6, "list_batches": 0.15, "list_files": 0.15, "upload": 0.1}


@dataclass
class LoadReport:
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)

    def percentile(self, op: str, q: float) -> float | None:
        values = sorted(self.latencies.get(op, []))
        if not values:
            return None
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict[str, Any]:
        ops = {}
        for op, values in sorted(self.latencies.items()):
            ops[op] = {"calls": len(values), "p50_ms": round(1000 * (self.percentile(op, 0.5) or 0), 2),
                       "p99_ms": round(1000 * (self.percentile(op, 0.99) or 0), 2),
                       "mean_ms": round(1000 * statistics.fmean(values), 2)}
        total = sum(len(v) for v in self.latencies.values())
        return {"clients": self.clients, "seconds": self.seconds, "calls": total,
                "calls_per_second": round(total / self.seconds, 1), "errors": len(self.errors),
                "first_errors": self.errors[:10], "ops": ops}


def small_file(tag: str) -> bytes:
    line = {"custom_id": tag, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo-model", "messages": [{"role": "user", "content": "hi"}]}}
    return (json.dumps(line) + "\n").encode()


async def client_loop(http: httpx.AsyncClient, number: int, batch_id: str, until: float, report: LoadReport,
                      rng: random.Random) -> None:
    ops, weights = list(MIX), list(MIX.values())
    turn = 0
    while time.monotonic() < until:
        op = rng.choices(ops, weights)[0]
        turn += 1
        started = time.perf_counter()
        try:
            if op == "status":
                response = await http.get(f"/v1/batches/{batch_id}")
            elif op == "list_batches":
                response = await http.get("/v1/batches", params={"limit": 20})
            elif op == "list_files":
                response = await http.get("/v1/files", params={"limit": 20})
            else:
                response = await http.post("/v1/files", data={"purpose": "batch"},
                                           files={"file": ("s.jsonl", small_file(f"c{number}-{turn}"))})
        except httpx.HTTPError as exc:
            report.errors.append(f"{op}: {type(exc).__name__}: {exc}")
            continue
        report.latencies[op].append(time.perf_counter() - started)
        if response.status_code != 200 or "database is locked" in response.text:
            report.errors.append(f"{op}: {response.status_code} {response.text[:200]}")


async def run_load(base_url: str, batch_id: str, clients: int, seconds: float, seed: int = 1) -> LoadReport:
    """`clients` concurrent clients against `base_url` (…/v1 stripped) for `seconds`."""
    report = LoadReport(clients, seconds)
    rng = random.Random(seed)
    https = [httpx.AsyncClient(base_url=base_url, timeout=60) for _ in range(clients)]
    try:
        # Connect everyone first: creating 50 clients and their connections costs the *client* process about
        # a second, which would otherwise show up as the server's p99.
        await asyncio.gather(*(http.get("/health") for http in https))
        until = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(http, i, batch_id, until, report, random.Random(rng.random()))
                               for i, http in enumerate(https)))
    finally:
        await asyncio.gather(*(http.aclose() for http in https))
    return report


def start_batch(base_url: str, requests: int) -> str:
    lines = b"".join(small_file(f"r{i}") for i in range(requests))
    with httpx.Client(base_url=base_url, timeout=60) as http:
        file_id = http.post("/v1/files", data={"purpose": "batch"},
                            files={"file": ("load.jsonl", lines)}).raise_for_status().json()["id"]
        return str(http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"}).raise_for_status().json()["id"])


def main() -> None:
    parser = common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=50_000, help="size of the batch running meanwhile")
    args = parser.parse_args()
    with workdir(args.keep, prefix="vllm-batch-load-") as scratch:
        server = Server(scratch / "data", extra_args=["--echo-delay", "0.002", "--window", "64"])
        with server.start():
            batch_id = start_batch(server.base_url, args.requests)
            say(f"batch {batch_id} running; {args.clients} clients for {args.seconds:.0f}s")
            report = asyncio.run(run_load(server.base_url, batch_id, args.clients, args.seconds))
            with httpx.Client(base_url=server.base_url) as http:
                batch = http.get(f"/v1/batches/{batch_id}").json()
            locked = server.log_tail(10**9).count("database is locked")
    summary = report.summary()
    summary["batch_progress"] = batch["request_counts"]
    summary["database_locked_in_log"] = locked
    print_table(f"{args.clients} clients for {args.seconds:.0f}s while a batch runs "
                f"({summary['calls_per_second']} calls/s, {summary['errors']} errors)",
                ["call", "count", "p50 ms", "p99 ms", "mean ms"],
                [(op, s["calls"], s["p50_ms"], s["p99_ms"], s["mean_ms"]) for op, s in summary["ops"].items()])
    if summary["errors"] or locked:
        print("errors:", *summary["first_errors"], f"'database is locked' in log: {locked}", sep="\n  ")
    if not args.no_json:
        say(f"wrote {write_results('load_status', summary)}")
    raise SystemExit(1 if summary["errors"] or locked else 0)


if __name__ == "__main__":
    main()
