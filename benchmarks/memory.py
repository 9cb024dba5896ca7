"""Memory: the server's RSS through a 1 GB upload and its download, and a 50,000-line batch and its output.

Uploads are streamed to disk and downloads streamed from disk, and the runner holds only the requests in
flight, so none of these should grow the server by more than a small constant (target: < 100 MB). RSS is
sampled every 50 ms; growth is the peak of each phase minus the RSS of the warmed-up idle server.

The client's side (RSS while adding 1,000,000 requests) is `benchmarks.client_memory`, run from here when it
exists.

    python -m benchmarks.memory [--upload-mb 1024] [--lines 50000] [--skip-client]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    MB,
    REPO,
    BatchAPI,
    RssSampler,
    Server,
    common_args,
    print_table,
    round_trip,
    say,
    workdir,
    write_jsonl,
    write_results,
)
from benchmarks.pipeline import CHAT, chat_lines

TARGET_SERVER_MB = 100.0


def write_big_jsonl(path: Path, size: int) -> tuple[int, str]:
    """A valid batch input of about `size` bytes (1 KiB lines); returns its line count and sha256."""
    filler = "lorem ipsum dolor sit amet " * 34
    # One json.dumps, then only the numbers change: a GiB of lines in seconds.
    template = json.dumps({"custom_id": "big-@@", "method": "POST", "url": CHAT, "body": {
        "model": "echo-model", "max_tokens": 8, "messages": [{"role": "user", "content": f"@@ {filler}"}]}})
    head, middle, tail = template.split("@@")
    digest = hashlib.sha256()
    written = lines = 0
    with open(path, "wb") as fh:
        while written < size:
            data = "".join(f"{head}{i}{middle}{i}{tail}\n" for i in range(lines, lines + 4096)).encode()
            fh.write(data)
            digest.update(data)
            written += len(data)
            lines += 4096
    return lines, digest.hexdigest()


def download_discarding(api: BatchAPI, file_id: str) -> tuple[int, str]:
    """Stream a file's content, hashing it instead of storing it; (bytes, sha256)."""
    digest = hashlib.sha256()
    size = 0
    with api.client.stream("GET", f"/v1/files/{file_id}/content") as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def run_client_memory(argv: list[str]) -> dict[str, Any] | None:
    """benchmarks.client_memory (the client engineer's), if it is there; its own output goes to stdout."""
    if not (Path(__file__).parent / "client_memory.py").exists():
        say("benchmarks/client_memory.py is not there yet: client memory skipped")
        return None
    say("running benchmarks.client_memory")
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.client_memory", *argv], cwd=REPO, check=False)
    latest = Path(__file__).parent / "results" / "client_memory-latest.json"
    result: dict[str, Any] = {"returncode": proc.returncode, "seconds": time.perf_counter() - began}
    if latest.exists() and latest.stat().st_mtime >= time.time() - (time.perf_counter() - began) - 1:
        result["results"] = json.loads(latest.read_text())
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__))
    parser.add_argument("--upload-mb", type=int, default=1024, help="size of the uploaded file, MiB")
    parser.add_argument("--lines", type=int, default=50_000, help="lines of the batch")
    parser.add_argument("--skip-client", action="store_true", help="do not run benchmarks.client_memory")
    args = parser.parse_args(argv)

    phases: list[dict[str, Any]] = []
    with workdir(args.keep) as scratch:
        big = scratch / "big.jsonl"
        say(f"writing a {args.upload_mb} MiB input file")
        big_lines, big_sha = write_big_jsonl(big, args.upload_mb * MB)
        batch_input = scratch / "batch.jsonl"
        write_jsonl(batch_input, chat_lines(args.lines))

        limits = ["--max-file-bytes", str(args.upload_mb * MB * 2),
                  "--max-batch-lines", str(max(args.lines, 50_000))]
        server = Server(scratch / "data", extra_args=limits)
        with server.start():
            api = BatchAPI(server.base_url)
            try:
                # Warm up every code path once (imports, SQLite pages, first allocations) on a small batch.
                small = scratch / "small.jsonl"
                write_jsonl(small, chat_lines(500))
                round_trip(api, small, CHAT, scratch / "small-out.jsonl")
                time.sleep(0.5)
                with RssSampler(server.pid, interval=0.05) as rss:
                    time.sleep(0.3)
                    baseline = rss.mark("idle")

                    def phase(name: str, began: float, seconds: float, size: int) -> None:
                        peak = rss.peak_between(began, time.monotonic() - rss._t0)
                        phases.append({"phase": name, "seconds": seconds, "bytes": size,
                                       "peak_rss_mb": peak / MB, "growth_mb": (peak - baseline) / MB})
                        say(f"{name}: {seconds:.1f} s, peak RSS {peak / MB:.1f} MB "
                            f"(+{(peak - baseline) / MB:.1f} MB)")

                    t = time.monotonic() - rss._t0
                    began = time.perf_counter()
                    file_id = api.upload(big)
                    phase(f"upload {args.upload_mb} MiB", t, time.perf_counter() - began, big.stat().st_size)

                    t = time.monotonic() - rss._t0
                    began = time.perf_counter()
                    size, sha = download_discarding(api, file_id)
                    assert (size, sha) == (big.stat().st_size, big_sha), "download differs from upload"
                    phase(f"download {args.upload_mb} MiB", t, time.perf_counter() - began, size)
                    api.delete(file_id)
                    big.unlink()

                    t = time.monotonic() - rss._t0
                    began = time.perf_counter()
                    trip = round_trip(api, batch_input, CHAT, scratch / "batch-out.jsonl")
                    assert trip.batch["request_counts"]["completed"] == args.lines, trip.batch
                    phase(f"batch of {args.lines:,} lines, upload to download", t,
                          time.perf_counter() - began, trip.output_bytes)
                    whole = rss.peak
            finally:
                api.close()

    rows = [[p["phase"], p["seconds"], p["bytes"] / MB, p["peak_rss_mb"], p["growth_mb"]] for p in phases]
    rows.insert(0, ["idle, warmed up", None, None, baseline / MB, 0.0])
    growth = (whole - baseline) / MB
    print_table("Server memory (echo engine)", ["phase", "s", "MiB moved", "peak RSS MB", "growth MB"], rows)
    print(f"\nlargest server RSS growth: {growth:.1f} MB (target < {TARGET_SERVER_MB:.0f} MB)")
    payload: dict[str, Any] = {
        "upload_mb": args.upload_mb, "upload_lines": big_lines, "batch_lines": args.lines,
        "baseline_rss_mb": baseline / MB, "phases": phases, "max_growth_mb": growth,
        "targets": {"server_growth_mb": TARGET_SERVER_MB, "server_met": growth < TARGET_SERVER_MB},
    }
    if not args.skip_client:
        payload["client"] = run_client_memory([])
    if not args.no_json:
        say(f"wrote {write_results('memory', payload)}")
    return payload


if __name__ == "__main__":
    main()
