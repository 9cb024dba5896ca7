"""Batches past OpenAI's 50,000-line limit: peak RSS and requests/s at 1M and 10M lines, and a `kill -9`
resume at 10M, side by side from one run (issue 29).

Each size runs on a fresh echo-engine server: upload, validation, the run, and the output's download, which
checks that every custom_id came back exactly once (streamed: the benchmark keeps one byte per line). The
server's RSS and its children's are sampled every `--sample` seconds throughout. The resume run kills the
server's process group with SIGKILL once `--kill-at` of the batch is committed, starts it again on the same
data directory and lets it finish; its two lives are reported apart.

The inputs are `benchmarks.pipeline`'s chat lines (about 245 bytes each: 2.45 GB at 10M), written to the
scratch directory and removed afterwards, with the servers' data. Mind the disk: the 10M run needs about
3 × the input (the input, the server's copy, the output part).

    python -m benchmarks.big_batch [--lines 1000000,10000000] [--resume-lines 10000000] [--kill-at 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    MB,
    BatchAPI,
    RssSampler,
    Server,
    common_args,
    print_table,
    say,
    workdir,
    write_results,
)
from benchmarks.pipeline import CHAT, chat_lines

TARGET_RSS_MIB = 300.0  # at 10M lines, a fresh run and a resumed one alike
TARGET_RPS_RATIO = 0.8  # req/s at the largest size over req/s at the smallest


def write_input(path: Path, lines: int) -> int:
    """`lines` of benchmarks.pipeline's chat lines, written a chunk at a time; returns the file's size."""
    # One json.dumps, then only the numbers change: ten million lines in seconds, not minutes.
    template = json.dumps(chat_lines(1)[0], separators=(",", ":")).replace("request-0", "request-@@")
    template = template.replace("Request 0:", "Request @@:")
    head, middle, tail = template.split("@@")
    size = 0
    with open(path, "wb") as fh:
        for start in range(0, lines, 8192):
            data = "".join(f"{head}{i}{middle}{i}{tail}\n" for i in range(start, min(start + 8192, lines)))
            size += fh.write(data.encode())
    return size


class Phases:
    """Wall-clock marks of one batch's life, from polling it: the moments its status was first seen."""

    def __init__(self, rss: RssSampler) -> None:
        self.rss = rss
        self.marks: dict[str, float] = {}
        self.progress: list[tuple[float, int]] = []  # (time, results committed) at each poll

    def rates(self, parts: int = 10) -> list[float]:
        """req/s in each `parts`-th of the run's results (from the polls): does the run slow down as it goes?"""
        if len(self.progress) < 2:
            return []
        start, total = self.progress[0][1], self.progress[-1][1]
        bounds = [start + (total - start) * i / parts for i in range(parts + 1)]

        def when(count: float) -> float:  # linear between the polls around it
            for (t0, c0), (t1, c1) in pairwise(self.progress):
                if c0 <= count <= c1:
                    return t0 + (t1 - t0) * ((count - c0) / (c1 - c0) if c1 > c0 else 0)
            return self.progress[-1][0]

        times = [when(b) for b in bounds]
        return [(bounds[i + 1] - bounds[i]) / (times[i + 1] - times[i]) if times[i + 1] > times[i] else 0.0
                for i in range(parts)]

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic() - self.rss._t0)

    def at(self, name: str) -> float:
        """When `name` was first seen; a status polling missed (a fast validation) counts as the next one's."""
        order = ["launched", "healthy", "resumed", "upload", "uploaded", "created", "validating", "in_progress",
                 "finalizing", "completed", "download", "downloaded"]
        for later in order[order.index(name):]:
            if later in self.marks:
                return self.marks[later]
        raise KeyError(name)

    def peak(self, start: str, end: str) -> int:
        return self.rss.peak_between(self.at(start), self.at(end))


def wait(api: BatchAPI, batch_id: str, phases: Phases, poll: float, until_committed: int | None = None,
         on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Poll until the batch ends (or has `until_committed` results committed), marking each status change."""
    while True:
        batch = api.batch(batch_id)
        if on_status is not None and batch["status"] not in phases.marks:
            on_status(batch["status"])
        phases.mark(batch["status"])
        counts = batch["request_counts"]
        if batch["status"] == "in_progress":
            phases.progress.append((time.monotonic(), counts["completed"] + counts["failed"]))
        if until_committed is not None and counts["completed"] + counts["failed"] >= until_committed:
            return batch
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(poll)


def check_output(api: BatchAPI, file_id: str, lines: int) -> dict[str, Any]:
    """Stream the output file, counting each `request-N` custom_id: (bytes, every id exactly once)."""
    seen = bytearray(lines)
    key = b'"custom_id":"request-'
    extra = total = size = 0
    rest = b""
    with api.client.stream("GET", f"/v1/files/{file_id}/content") as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(4 * MB):
            size += len(chunk)
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            for raw in parts:
                at = raw.find(key, 0, 160) + len(key)
                index = int(raw[at:raw.index(b'"', at)])
                total += 1
                if seen[index]:
                    extra += 1
                else:
                    seen[index] = 1
    missing = seen.count(0)
    return {"bytes": size, "results": total, "duplicated": extra, "missing": missing,
            "exactly_once": extra == 0 and missing == 0 and not rest}


def start_server(data: Path, lines: int, size: int, gc_stats: Path | None = None) -> Server:
    server = Server(data, extra_args=["--max-batch-lines", str(lines), "--max-file-bytes", str(size + MB)])
    if gc_stats is not None:
        server.module, server.env = "benchmarks._gc_server", {"BENCH_GC_STATS": str(gc_stats)}
    return server


class GcStats:
    """The server's full (generation-2) garbage collections during a batch's run, from benchmarks._gc_server."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: Server | None = None

    def on_status(self, status: str) -> None:
        if status in ("in_progress", "completed") and self.server is not None and self.server.process:
            os.kill(self.server.pid, signal.SIGUSR2)

    def during_run(self) -> dict[str, float] | None:
        """Full collections and seconds in them between the two dumps (in_progress, completed)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            if len(lines) >= 2:
                first, last = (json.loads(line)["collections"]["2"] for line in lines[:2])
                return {"full_collections": last[0] - first[0], "seconds": last[1] - first[1]}
            time.sleep(0.1)
        return None


def run_once(scratch: Path, source: Path, lines: int, size: int, sample: float, poll: float,
             gc_stats: bool = True) -> dict[str, Any]:
    """One batch on a fresh server, upload to checked download."""
    data = scratch / f"data-{lines}"
    collections = GcStats(scratch / f"gc-{lines}.jsonl") if gc_stats else None
    server = start_server(data, lines, size, collections.path if collections else None).start()
    if collections is not None:
        collections.server = server
    api = BatchAPI(server.base_url, timeout=3600)
    try:
        with RssSampler(server.pid, interval=sample, children=True) as rss:
            phases = Phases(rss)
            idle = rss.mark("idle")
            phases.mark("upload")
            file_id = api.upload(source)
            phases.mark("uploaded")
            batch_id = api.create_batch(file_id, CHAT)["id"]
            phases.mark("created")
            batch = wait(api, batch_id, phases, poll, on_status=collections.on_status if collections else None)
            assert batch["status"] == "completed", batch
            phases.mark("download")
            checked = check_output(api, batch["output_file_id"], lines)
            phases.mark("downloaded")
        m = {name: phases.at(name) for name in ("upload", "uploaded", "created", "in_progress", "completed",
                                                 "download", "downloaded")}
        result = {
            "lines": lines, "input_bytes": size, "idle_rss_mib": idle / MB, "peak_rss_mib": rss.peak / MB,
            "peak_rss_mib_by_phase": {
                "upload": phases.peak("upload", "uploaded") / MB,
                "validation": phases.peak("created", "in_progress") / MB,
                "run": phases.peak("in_progress", "completed") / MB,
                "download": phases.peak("download", "downloaded") / MB},
            "upload_s": m["uploaded"] - m["upload"],
            "validation_s": m["in_progress"] - m["created"],
            "run_s": m["completed"] - m["in_progress"],
            "download_s": m["downloaded"] - m["download"],
            "batch_s": m["completed"] - m["created"],
            "wall_s": m["downloaded"] - m["upload"],
            **checked,
        }
        result["rps"] = lines / result["batch_s"]
        result["run_rps"] = lines / result["run_s"]
        result["run_rps_by_tenth"] = phases.rates()
        result["gc_during_run"] = collections.during_run() if collections else None
        return result
    finally:
        api.close()
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def run_resume(scratch: Path, source: Path, lines: int, size: int, kill_at: float, sample: float,
               poll: float) -> dict[str, Any]:
    """One batch killed with SIGKILL part way, then resumed to the end on a restarted server."""
    data = scratch / f"data-resume-{lines}"
    server = start_server(data, lines, size).start()
    api = BatchAPI(server.base_url, timeout=3600)
    try:
        with RssSampler(server.pid, interval=sample, children=True) as rss:
            phases = Phases(rss)
            file_id = api.upload(source)
            batch_id = api.create_batch(file_id, CHAT)["id"]
            batch = wait(api, batch_id, phases, poll, until_committed=int(lines * kill_at))
        counts = batch["request_counts"]
        first_life = {"peak_rss_mib": rss.peak / MB,
                      "committed_seen": counts["completed"] + counts["failed"]}
        server.kill()
        say(f"killed after {first_life['committed_seen']:,} results committed")
        server.launch()
        with RssSampler(server.pid, interval=sample, children=True) as rss:
            phases = Phases(rss)
            phases.mark("launched")
            server.wait_healthy()
            phases.mark("healthy")
            after_kill = api.batch(batch_id)["request_counts"]
            committed = after_kill["completed"] + after_kill["failed"]
            while True:  # the first result committed after the restart: recovery is over
                batch = api.batch(batch_id)
                counts = batch["request_counts"]
                if counts["completed"] + counts["failed"] > committed or batch["status"] != "in_progress":
                    break
                time.sleep(0.05)
            phases.mark("resumed")
            batch = wait(api, batch_id, phases, poll)
            assert batch["status"] == "completed", batch
            phases.mark("download")
            checked = check_output(api, batch["output_file_id"], lines)
            phases.mark("downloaded")
        m = {name: phases.at(name) for name in ("launched", "healthy", "resumed", "completed", "download",
                                                 "downloaded")}
        remaining = lines - committed
        return {
            "lines": lines, "kill_at": kill_at, "first_life": first_life, "committed_at_kill": committed,
            "peak_rss_mib": rss.peak / MB,
            "peak_rss_mib_recovery": phases.peak("launched", "resumed") / MB,
            "healthy_s": m["healthy"] - m["launched"], "resumed_s": m["resumed"] - m["launched"],
            "batch_s": m["completed"] - m["launched"], "rps": remaining / (m["completed"] - m["launched"]),
            "run_rps_by_tenth": phases.rates(),
            "download_s": m["downloaded"] - m["download"], **checked,
        }
    finally:
        api.close()
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.big_batch", description=__doc__))
    parser.add_argument("--lines", default="1000000,10000000", help="batch sizes, comma-separated")
    parser.add_argument("--resume-lines", type=int, default=10_000_000,
                        help="size of the batch killed and resumed (0: no resume run)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction committed when the kill comes")
    parser.add_argument("--sample", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between status polls")
    parser.add_argument("--no-gc-stats", action="store_true",
                        help="run the plain CLI, not benchmarks._gc_server (which times the server's collections)")
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.lines.split(",") if n.strip())

    runs: list[dict[str, Any]] = []
    resume: dict[str, Any] | None = None
    with workdir(args.keep, prefix="vllm-batch-big-") as scratch:
        for lines in sorted({*sizes, args.resume_lines} - {0}):
            source = scratch / f"input-{lines}.jsonl"
            say(f"writing {lines:,} lines")
            size = write_input(source, lines)
            if lines in sizes:
                say(f"{lines:,} lines ({size / MB:,.0f} MiB): upload, run, download")
                run = run_once(scratch, source, lines, size, args.sample, args.poll, not args.no_gc_stats)
                runs.append(run)
                say(f"{lines:,} lines: peak RSS {run['peak_rss_mib']:.0f} MiB, {run['rps']:,.0f} req/s, "
                    f"exactly once: {run['exactly_once']}")
            if lines == args.resume_lines:
                say(f"{lines:,} lines: kill -9 at {args.kill_at:.0%}, then resume")
                resume = run_resume(scratch, source, lines, size, args.kill_at, args.sample, args.poll)
                say(f"resumed: peak RSS {resume['peak_rss_mib']:.0f} MiB, exactly once: {resume['exactly_once']}")
            source.unlink()

    rows = [[f"{r['lines']:,}", r["input_bytes"] / MB, r["upload_s"], r["validation_s"], r["run_s"],
             r["download_s"], r["bytes"] / MB, r["rps"], r["idle_rss_mib"], r["peak_rss_mib"],
             "yes" if r["exactly_once"] else "NO"] for r in runs]
    if resume is not None:
        rows.append([f"{resume['lines']:,}: the life killed at {resume['kill_at']:.0%}", None, None, None, None,
                     None, None, None, None, resume["first_life"]["peak_rss_mib"], None])
        rows.append([f"{resume['lines']:,}: resumed ({resume['committed_at_kill']:,} done)", None, None,
                     None, resume["batch_s"], resume["download_s"], resume["bytes"] / MB, resume["rps"], None,
                     resume["peak_rss_mib"], "yes" if resume["exactly_once"] else "NO"])
    print_table("Big batches on the echo engine (server and children)",
                ["lines", "input MiB", "upload s", "validate s", "run s", "download s", "output MiB", "req/s",
                 "idle MiB", "peak RSS MiB", "exactly once"], rows)
    print("req/s: lines over batch creation → completed (validation and run); resumed: the remaining lines "
          "over restart → completed")
    if any(r.get("gc_during_run") for r in runs):
        print_table("The server's full garbage collections while the batch ran",
                    ["lines", "collections", "seconds in them", "ms each"],
                    [[f"{r['lines']:,}", r["gc_during_run"]["full_collections"], r["gc_during_run"]["seconds"],
                      r["gc_during_run"]["seconds"] * 1000 / max(1, r["gc_during_run"]["full_collections"])]
                     for r in runs if r.get("gc_during_run")])
    print_table("Run req/s by tenth of the results committed (does a run slow down as it goes?)",
                ["lines", *(f"{i + 1}/10" for i in range(10))],
                [[f"{r['lines']:,}", *r["run_rps_by_tenth"]] for r in runs if len(r["run_rps_by_tenth"]) == 10])

    largest = max(runs, key=lambda r: r["lines"]) if runs else None
    smallest = min(runs, key=lambda r: r["lines"]) if runs else None
    peaks = [r["peak_rss_mib"] for r in runs if largest and r["lines"] == largest["lines"]]
    if resume is not None:
        peaks += [resume["peak_rss_mib"], resume["first_life"]["peak_rss_mib"]]
    ratio = largest["rps"] / smallest["rps"] if largest and smallest else None
    exact = all(r["exactly_once"] for r in runs) and (resume is None or resume["exactly_once"])
    targets = {
        "max_peak_rss_mib": max(peaks, default=None), "rss_met": max(peaks, default=0) <= TARGET_RSS_MIB,
        "rps_ratio": ratio, "rps_met": ratio is not None and ratio >= TARGET_RPS_RATIO,
        "exactly_once": exact,
    }
    if ratio is not None:
        print(f"\nreq/s at {largest['lines']:,} over req/s at {smallest['lines']:,}: {ratio:.2f} "
              f"(target ≥ {TARGET_RPS_RATIO})")
    if peaks:
        print(f"largest peak RSS at {largest['lines'] if largest else resume and resume['lines']:,} lines: "
              f"{max(peaks):.0f} MiB (target ≤ {TARGET_RSS_MIB:.0f} MiB)")
    payload: dict[str, Any] = {"runs": runs, "resume": resume, "targets": targets,
                               "settings": {"sample_s": args.sample, "kill_at": args.kill_at}}
    if not args.no_json:
        say(f"wrote {write_results('big_batch', payload)}")
    return payload


if __name__ == "__main__":
    main()
