"""Partial results: reading a batch's output page by page (`GET /v1/batches/{id}/output?after_line=N`) against
downloading the whole file once, and what the server's remembered line offsets save a reader that continues.

    python -m benchmarks.partial_results [--lines 50000] [--page 1000]

1. Over HTTP, on a finished echo-engine batch: every page in turn vs one `GET /v1/files/{id}/content`.
2. In process, on the same output file: reading every page with the line index (each page starts where the
   last ended) vs without it (each page scans from the first line: what a reader would cost without it).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import BatchAPI, Server, common_args, print_table, say, workdir, write_jsonl, write_results


def http_pages(api: BatchAPI, batch_id: str, page: int) -> tuple[float, int, int]:
    started = time.perf_counter()
    after = lines = size = 0
    while True:
        response = api.client.get(f"/v1/batches/{batch_id}/output", params={"after_line": after, "limit": page})
        response.raise_for_status()
        got = response.content.count(b"\n")
        lines += got
        size += len(response.content)
        after = int(response.headers["x-next-line"])
        if got < page:
            return time.perf_counter() - started, lines, size


def in_process(output: Path, lines: int, page: int, remember: bool) -> float:
    from vllm_batch_server.results.partial import CommittedResults, LineIndex
    from vllm_batch_server.statuses import BatchStatus
    from vllm_batch_server.store.blobs import Blobs
    from vllm_batch_server.store.database import BatchRow, Checkpoint, Database
    from vllm_batch_server.store.lifecycle import Lifecycle

    class Forgetful(LineIndex):
        def remember(self, key: tuple[str, str], line: int, offset: int) -> None:
            return None

    async def run() -> float:
        data = output.parent / ("indexed" if remember else "scanning")
        blobs = Blobs(data)
        blobs.prepare()
        db = await Database.open(data / "db.sqlite3")
        batch = await Lifecycle(db).create(BatchRow(id="batch_bench", endpoint="/v1/chat/completions",
                                                    input_file_id="file-x", completion_window="24h",
                                                    status=BatchStatus.VALIDATING, created_at=0))
        await Lifecycle(db).move(batch.id, BatchStatus.IN_PROGRESS)
        part = blobs.part_paths(batch.id)[0]
        part.parent.mkdir(parents=True)
        shutil.copyfile(output, part)
        committer = Lifecycle(db).checkpoint_committer()  # committed up to the whole part, as a checkpoint does
        committer.commit(batch.id, Checkpoint(part.stat().st_size, 0, 0, 0, 0, 0, 0))
        committer.close()
        results = CommittedResults(db, blobs)
        if not remember:
            results.index = Forgetful()
        started = time.perf_counter()
        after = 0
        while after < lines:
            fd, size, status = await results.open(batch.id, "output")
            found = results.locate(batch.id, "output", fd, size, status, after, page)
            for _ in found.chunks():
                pass
            after = found.next_line
        elapsed = time.perf_counter() - started
        await db.close()
        return elapsed

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--page", type=int, default=1000)
    args = parser.parse_args(argv)
    with workdir(args.keep) as tmp:
        source = tmp / "input.jsonl"
        write_jsonl(source, ({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"model": "echo-model", "messages": [
                                  {"role": "user", "content": f"request {i} " + "word " * 40}]}}
                             for i in range(args.lines)))
        with Server(tmp / "data", extra_args=["--max-batch-lines", str(args.lines)]).start() as server:
            api = BatchAPI(server.base_url)
            created = api.create_batch(api.upload(source), "/v1/chat/completions")
            done = api.wait(created["id"], poll=0.2)
            say(f"batch {done['id']} {done['status']}: {done['request_counts']}")
            started = time.perf_counter()
            output = tmp / "output.jsonl"
            whole_bytes = api.download(done["output_file_id"], output)
            whole = time.perf_counter() - started
            paged, lines, paged_bytes = http_pages(api, done["id"], args.page)
            api.close()
        assert lines == args.lines and paged_bytes == whole_bytes, (lines, paged_bytes, whole_bytes)
        indexed = in_process(output, args.lines, args.page, remember=True)
        scanning = in_process(output, args.lines, args.page, remember=False)
    pages = -(-args.lines // args.page)
    rows: list[list[Any]] = [
        ["HTTP: one download of the file", f"{whole:.2f} s", f"{whole_bytes / whole / 1e6:.0f} MB/s", "1.00"],
        [f"HTTP: {pages} pages of {args.page} lines", f"{paged:.2f} s", f"{paged_bytes / paged / 1e6:.0f} MB/s",
         f"{paged / whole:.2f}"],
        ["in process: pages, line index on", f"{indexed:.2f} s", f"{pages / indexed:.0f} pages/s", "1.00"],
        ["in process: pages, rescanning each", f"{scanning:.2f} s", f"{pages / scanning:.0f} pages/s",
         f"{scanning / indexed:.2f}"],
    ]
    print_table(f"Reading {args.lines:,} result lines ({whole_bytes / 1e6:.1f} MB)", ["how", "time", "rate", "ratio"],
                rows)
    if not args.no_json:
        write_results("partial_results", {"lines": args.lines, "page": args.page, "bytes": whole_bytes,
                                          "download_s": whole, "paged_http_s": paged, "indexed_s": indexed,
                                          "rescanning_s": scanning})
    return 0


if __name__ == "__main__":
    sys.exit(main())
