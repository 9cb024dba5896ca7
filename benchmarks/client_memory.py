"""Client memory: RSS of the vllm_batch client while it builds a huge batch and moves large files.

1. Add 1,000,000 small chat requests with `add_to_batch` (validated, spooled to disk, custom ids indexed
   in SQLite). Target: RSS growth < 50 MB — memory must not grow with the number of requests.
2. Against a real echo server: upload a large input, download its large output, and iterate `results()`
   over it. Uploads and downloads are streamed and results are joined through an on-disk index, so RSS
   should stay flat whatever the file sizes.

RSS is sampled every 50 ms in this process; growth is each phase's peak minus the RSS measured just before
it (after imports and a warm-up, so one-off import costs are not counted). Prints a table and writes
benchmarks/results/client_memory-*.json. Not a timed test.

    python -m benchmarks.client_memory [--requests 1000000] [--download-lines 40000] [--prompt-bytes 5000]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import MB, RssSampler, Server, common_args, print_table, say, workdir, write_results
from vllm_batch import VLLMBatch

TARGET_ADD_MB = 50.0


def phase(sampler: RssSampler, name: str, fn: Any) -> dict[str, Any]:
    gc.collect()
    before = sampler.mark(f"{name}:start")
    t0 = time.monotonic() - sampler._t0
    began = time.perf_counter()
    detail = fn() or {}
    seconds = time.perf_counter() - began
    after = sampler.mark(f"{name}:end")
    peak = max(sampler.peak_between(t0, time.monotonic() - sampler._t0), after)
    row = {"phase": name, "seconds": round(seconds, 2), "rss_before_mb": round(before / MB, 1),
           "peak_growth_mb": round((peak - before) / MB, 1), "end_growth_mb": round((after - before) / MB, 1),
           **detail}
    say(f"{name}: {row}")
    return row


def add_many(scratch: Path, n: int) -> dict[str, Any]:
    with VLLMBatch(base_url="http://127.0.0.1:9/v1", workdir=scratch / "add") as batch:
        for i in range(n):
            batch.add_to_batch(model="echo-model", messages=[{"role": "user", "content": f"question {i}?"}],
                               max_tokens=16)
        spool = batch._core.spool
        assert spool is not None
        spool.flush()
        return {"requests": len(batch), "spool_mb": round(spool.stats.bytes / MB, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.client_memory", description=__doc__))
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests added in phase 1")
    parser.add_argument("--download-lines", type=int, default=40_000, help="requests of the big batch")
    parser.add_argument("--prompt-bytes", type=int, default=5_000, help="prompt size of each big request")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    with workdir(args.keep, prefix="vllm-batch-client-mem-") as scratch, RssSampler(os.getpid()) as sampler:
        # Warm up: imports, the openai client, pydantic's validators, SQLite.
        add_many(scratch / "warm", 1000)

        row = phase(sampler, "add 1M requests", lambda: add_many(scratch, args.requests))
        row["per_request_us"] = round(row["seconds"] / max(args.requests, 1) * 1e6, 1)
        rows.append(row)

        say("starting an echo server")
        server = Server(scratch / "server", extra_args=["--max-batch-lines", str(max(args.download_lines, 50_000)),
                                                        "--max-file-bytes", str(4 * 1024 * MB)]).start()
        try:
            big = VLLMBatch(base_url=server.base_url + "/v1", workdir=scratch / "big", output_dir=scratch)
            filler = "lorem ipsum dolor sit amet " * (args.prompt_bytes // 27 + 1)
            for i in range(args.download_lines):
                big.add_to_batch(model="echo-model", max_tokens=100_000,
                                 messages=[{"role": "user", "content": f"{i} {filler[: args.prompt_bytes]}"}])

            def upload() -> dict[str, Any]:
                big.submit()
                spool = big._core.spool
                assert spool is not None
                return {"input_mb": round(spool.stats.bytes / MB, 1)}

            rows.append(phase(sampler, "upload", upload))
            say("waiting for the batch")
            big.wait(poll_interval=2, progress=False, timeout=3600)

            def download() -> dict[str, Any]:
                out, _ = big.download()
                assert out is not None
                return {"output_mb": round(out.stat().st_size / MB, 1)}

            rows.append(phase(sampler, "download", download))

            def iterate() -> dict[str, Any]:
                count = ok = 0
                for result in big.results():
                    count += 1
                    ok += result.ok
                return {"results": count, "ok": ok}

            rows.append(phase(sampler, "results()", iterate))
            big.close()
        finally:
            server.kill()

    print_table("vllm_batch client memory (RSS growth, MB)",
                ["phase", "seconds", "peak growth", "end growth", "size"],
                [[r["phase"], r["seconds"], r["peak_growth_mb"], r["end_growth_mb"],
                  r.get("spool_mb") or r.get("input_mb") or r.get("output_mb") or r.get("results")]
                 for r in rows])
    verdict = rows[0]["peak_growth_mb"] < TARGET_ADD_MB
    print(f"\nadding {args.requests:,} requests: peak RSS growth {rows[0]['peak_growth_mb']} MB "
          f"(target < {TARGET_ADD_MB:g} MB): {'PASS' if verdict else 'FAIL'}")
    payload = {"phases": rows, "target_add_mb": TARGET_ADD_MB, "add_within_target": verdict,
               "args": vars(args)}
    if not args.no_json:
        write_results("client_memory", payload)
    return payload


if __name__ == "__main__":
    main()
