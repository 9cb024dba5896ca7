"""The structures that could find duplicate custom_ids in a batch of N lines, measured side by side (issue 29).

Each runs in a fresh process over N ids (`request-0` ... made on the fly, so the ids' own strings count only
where a structure keeps them): add every id with its line number, then ask for the duplicates (there are none).
Reported: the process's peak RSS growth over a process that only makes the ids, per line, and the time per
line. `spill` is what the server uses (vllm_batch_server/queue/custom_ids.py).

    python -m benchmarks.id_structures [--ids 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks._harness import REPO, common_args, print_table, say, write_results

OPTIONS = {
    "nothing": "only making the ids (the baseline)",
    "set of ids": "set of the id strings (before issue 29)",
    "set of hashes": "set of 64-bit hashes (ints)",
    "sorted hashes": "array('q') of 64-bit hashes, sorted (via a list)",
    "sqlite": "SQLite table (hash, line) on disk, GROUP BY",
    "spill": "hashes by partition on a temporary file (chosen)",
}


def run_option(name: str, count: int, scratch: Path) -> None:
    ids = (f"request-{i}" for i in range(count))
    if name == "nothing":
        for _ in ids:
            pass
    elif name == "set of ids":
        seen: set[Any] = set()
        for custom_id in ids:
            if custom_id in seen:
                raise AssertionError(custom_id)
            seen.add(custom_id)
    elif name == "set of hashes":
        seen = set()
        for custom_id in ids:
            key = hash(custom_id)
            if key in seen:
                raise AssertionError(custom_id)
            seen.add(key)
    elif name == "sorted hashes":
        keys = array("q")
        for custom_id in ids:
            keys.append(hash(custom_id))
        ordered = array("q", sorted(keys))
        del keys
        assert all(a != b for a, b in pairwise(ordered))
    elif name == "sqlite":
        with tempfile.NamedTemporaryFile(dir=scratch, suffix=".sqlite3") as fh:
            db = sqlite3.connect(fh.name)
            db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-8192; "
                             "CREATE TABLE ids (hash INTEGER, line INTEGER);")
            db.executemany("INSERT INTO ids VALUES (?, ?)", ((hash(c), i) for i, c in enumerate(ids, 1)))
            assert db.execute("SELECT hash FROM ids GROUP BY hash HAVING count(*) > 1").fetchall() == []
            db.close()
    elif name == "spill":
        from vllm_batch_server.queue.custom_ids import DuplicateFinder

        empty = scratch / "empty.jsonl"
        empty.write_bytes(b"")
        # The size of an input of `count` lines of 245 bytes, which sets the number of partitions.
        with DuplicateFinder(count * 245, scratch) as finder:
            for line, custom_id in enumerate(ids, 1):
                finder.add(custom_id, line)
            assert finder.duplicates(empty, 101) == []
    else:
        raise ValueError(name)


def child(name: str, count: int, scratch: str) -> None:
    import vllm_batch_server.queue.custom_ids  # noqa: F401 - imported before the baseline: code is not data

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    run_option(name, count, Path(scratch))
    seconds = time.perf_counter() - began
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"seconds": seconds, "rss_growth": grown}))


def measure(name: str, count: int, scratch: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.id_structures", "--child", name, "--ids", str(count),
                          "--scratch", str(scratch)], cwd=REPO, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.id_structures", description=__doc__))
    parser.add_argument("--ids", type=int, default=1_000_000, help="custom_ids per structure")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.ids, args.scratch)
        return {}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-batch-ids-") as scratch:
        for name in OPTIONS:
            say(f"{name}: {args.ids:,} ids")
            results[name] = measure(name, args.ids, Path(scratch))
    base = results["nothing"]["seconds"]
    rows = [[name, results[name]["rss_growth"] / 2**20, results[name]["rss_growth"] / args.ids,
             (results[name]["seconds"] - base) / args.ids * 1e6, what]
            for name, what in OPTIONS.items() if name != "nothing"]
    print_table(f"Finding duplicates among {args.ids:,} custom_ids, each structure in a fresh process",
                ["structure", "peak RSS growth MiB", "bytes per line", "µs per line", "what"], rows)
    payload = {"ids": args.ids, "results": results}
    if not args.no_json:
        say(f"wrote {write_results('id_structures', payload)}")
    return payload


if __name__ == "__main__":
    main()
