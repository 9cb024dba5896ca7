"""Pipeline overhead: a 50,000-line chat batch on the echo engine at zero delay, end to end.

With no model cost, what is left is ours: upload, validation, scheduling, the runner, the result log and its
checkpoints, finalizing and the download. Measured with checkpointing on (the default: fsync and commit every
500 results or 1 s) and off, and against the limit: a bare loop in one process that reads, parses, answers,
serializes and writes the same lines (what any batch runner must do at least).

    python -m benchmarks.pipeline [--lines 50000] [--repeats 3] [--scrape 1]

`--scrape S` has a client read /metrics and /status every S seconds while the batches run (a Prometheus and
a dashboard watching), to measure what observing the server costs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks._harness import (
    BatchAPI,
    Server,
    common_args,
    cpu_seconds,
    print_table,
    round_trip,
    say,
    workdir,
    write_jsonl,
    write_results,
)

CHAT = "/v1/chat/completions"
TARGET_RPS = 5000.0
TARGET_CHECKPOINT_COST = 0.03


def chat_lines(count: int, model: str = "echo-model") -> list[dict[str, Any]]:
    return [{
        "custom_id": f"request-{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "max_tokens": 16, "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": f"Request {i}: summarize the benefits of batching in one line."},
        ]},
    } for i in range(count)]


def bare_loop(source: Path, dest: Path) -> float:
    """The floor: read, parse, answer (as the echo engine does), serialize, write, fsync once. Seconds."""
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    began = time.perf_counter()
    with open(source, "rb") as src, open(dest, "wb") as out:
        for raw in src:
            line = json.loads(raw)
            body = line["body"]
            words = body["messages"][-1]["content"].split()[: body.get("max_tokens", 16)]
            answer = {
                "id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
                "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(words), "completion_tokens": len(words),
                          "total_tokens": 2 * len(words), "prompt_tokens_details": {"cached_tokens": 0}},
            }
            result = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": line["custom_id"],
                      "response": {"status_code": 200, "request_id": secrets.token_hex(12), "body": answer},
                      "error": None}
            out.write(dumps(result).encode() + b"\n")
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - began


@contextlib.contextmanager
def watching(base_url: str, every: float | None) -> Iterator[list[int]]:
    """Read /metrics and /status every `every` seconds meanwhile (nothing when None); yields the count."""
    done, count = threading.Event(), [0]

    def watch() -> None:
        with httpx.Client(timeout=10) as http:
            while not done.wait(every):
                for path in ("/metrics", "/status"):
                    http.get(base_url + path).raise_for_status()
                count[0] += 1

    thread = threading.Thread(target=watch, daemon=True) if every else None
    if thread is not None:
        thread.start()
    try:
        yield count
    finally:
        done.set()
        if thread is not None:
            thread.join()


def measure_server(scratch: Path, source: Path, name: str, extra: list[str], repeats: int,
                   poll: float, scrape: float | None = None) -> list[dict[str, Any]]:
    runs = []
    server = Server(scratch / f"data-{name}", extra_args=["--max-batch-lines", "1000000", *extra])
    with server.start(), watching(server.base_url, scrape):
        api = BatchAPI(server.base_url)
        try:
            for index in range(repeats):
                cpu_before = cpu_seconds(server.pid)
                trip = round_trip(api, source, CHAT, scratch / f"out-{name}-{index}.jsonl", poll=poll)
                cpu = cpu_seconds(server.pid) - cpu_before
                counts = trip.batch["request_counts"]
                assert counts["completed"] == counts["total"], counts
                runs.append({"wall_s": trip.wall_s, "upload_s": trip.upload_s, "run_s": trip.run_s,
                             "download_s": trip.download_s, "server_cpu_s": cpu,
                             "output_bytes": trip.output_bytes})
                say(f"{name} #{index + 1}: {trip.wall_s:.2f} s (upload {trip.upload_s:.2f}, run "
                    f"{trip.run_s:.2f}, download {trip.download_s:.2f}; server CPU {cpu:.2f} s)")
                (scratch / f"out-{name}-{index}.jsonl").unlink(missing_ok=True)
        finally:
            api.close()
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__))
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=8,
                        help="batches per configuration (best and median reported; runs vary by ±25%% here)")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between status polls")
    parser.add_argument("--scrape", type=float, default=None, metavar="S",
                        help="read /metrics and /status every S seconds while batches run")
    args = parser.parse_args(argv)

    with workdir(args.keep) as scratch:
        source = scratch / "input.jsonl"
        write_jsonl(source, chat_lines(args.lines))
        say(f"{args.lines:,} lines, {source.stat().st_size / 2**20:.1f} MiB")

        bare = [bare_loop(source, scratch / "bare-out.jsonl") for _ in range(args.repeats)]
        # Interleave on/off so drift on a shared machine hits both alike.
        configs = {"checkpointing on": [], "checkpointing off": ["--no-checkpointing"]}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, extra in configs.items():
                runs[name] += measure_server(scratch, source, name.replace(" ", "-"), extra, 1, args.poll,
                                             args.scrape)

    n = args.lines
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    # Best of N: other work on a shared machine only ever adds time, so the minimum is the least noisy
    # estimate of what the pipeline itself costs; medians are kept in the JSON.
    bare_s = min(bare)
    summary["bare loop"] = {"wall_s": bare_s, "median_wall_s": statistics.median(bare), "rps": n / bare_s,
                            "us_per_request": bare_s / n * 1e6, "runs": bare}
    rows.append(["bare loop (limit)", bare_s, None, None, None, bare_s, n / bare_s, bare_s / n * 1e6, 1.0])
    for name, items in runs.items():
        best = min(items, key=lambda r: r["wall_s"])
        wall = best["wall_s"]
        cpu = min(r["server_cpu_s"] for r in items)
        summary[name] = {"wall_s": wall, "median_wall_s": statistics.median(r["wall_s"] for r in items),
                         "rps": n / wall, "us_per_request": wall / n * 1e6, "server_cpu_s": cpu,
                         "server_cpu_us_per_request": cpu / n * 1e6,
                         **{k: best[k] for k in ("upload_s", "run_s", "download_s")}, "runs": items}
        rows.append([f"server, {name}", wall, best["upload_s"], best["run_s"], best["download_s"], cpu,
                     n / wall, wall / n * 1e6, bare_s / wall])
    on, off = summary["checkpointing on"], summary["checkpointing off"]
    cost = on["wall_s"] / off["wall_s"] - 1
    cpu_cost = on["server_cpu_s"] / off["server_cpu_s"] - 1
    print_table(f"Pipeline overhead: {n:,} chat lines, echo engine, zero delay (best of {args.repeats})",
                ["system", "wall s", "upload s", "run s", "download s", "CPU s", "req/s", "µs/req",
                 "vs bare"], rows)
    print(f"\ncheckpointing cost: {cost * 100:+.1f}% wall time, {cpu_cost * 100:+.1f}% server CPU time "
          f"(target ≤ {TARGET_CHECKPOINT_COST * 100:.0f}%); end to end with checkpointing: "
          f"{on['rps']:,.0f} req/s (target ≥ {TARGET_RPS:,.0f})")
    payload = {"lines": n, "repeats": args.repeats, "results": summary, "checkpointing_cost": cost,
               "checkpointing_cpu_cost": cpu_cost,
               "targets": {"rps": TARGET_RPS, "rps_met": on["rps"] >= TARGET_RPS,
                           "checkpoint_cost": TARGET_CHECKPOINT_COST,
                           "checkpoint_cost_met": cost <= TARGET_CHECKPOINT_COST}}
    if not args.no_json:
        say(f"wrote {write_results('pipeline', payload)}")
    return payload


if __name__ == "__main__":
    main()
