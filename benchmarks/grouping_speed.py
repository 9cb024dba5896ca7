"""What prefix grouping costs the runner per request, on input shapes that exercise it.

Each shape is a JSONL batch file, taken `--lookahead` lines at a time. Every chunk of lines is then parsed
the way the runner parses them (`requests_in`) three ways, back to back, in an order that rotates from one
chunk to the next: streamed (what the runner does with grouping off); parsed and held as a chunk (what any
look-ahead costs: a chunk of long prompts no longer fits the CPU's caches); and parsed through
`group_by_prefix(..., prompt_reader(...), lookahead)`, as the runner does. Grouping's cost per request is
the difference between the last two, in CPU time of this process (the machine may be shared):

- "grouping µs": for each chunk, the best of `--repeats` of each way; the differences summed over the chunks.
  Interference (another process, a neighbour on the host) only ever adds time, so the best readings are the
  ones it spared, and each comes from a window of a few milliseconds rather than a whole pass over the file.
- "median of pairs" and "middle half": the difference of each back-to-back pair (chunks × repeats of them),
  to show how much the host disturbed the run.

Parsing the same lines for every way keeps the input identical and leaves reading the file, which all three
share, out of the differences.

    python -m benchmarks.grouping_speed [--requests 20000] [--lookahead 1024] [--repeats 11] [--shapes multi-turn]

Target: ≤ 2 µs per request on every shape.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

from benchmarks._harness import common_args, print_table, say, workdir, write_jsonl, write_results
from benchmarks._workloads import WORDS
from vllm_batch_server.queue.grouping import group_by_prefix, prompt_reader
from vllm_batch_server.store.jsonl import iter_raw_lines, requests_in

TARGET_US = 2.0


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(messages: list[tuple[str, str]]) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": role, "content": content} for role, content in messages],
            "max_tokens": 16}


def shapes(n: int, seed: int) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
    """Request bodies of each shape, generated lazily (the files are written one at a time)."""
    rng = random.Random(seed)
    system = "Answer from the document only. " + words(rng, 400)
    documents = [f"Document {d}. " + words(rng, 500) for d in range(256)]
    turns = [words(rng, 60) for _ in range(16)]

    def interleaved(with_system: bool) -> Iterator[dict[str, Any]]:
        for i in range(n):  # question q of every document, then question q + 1 of every document
            document, question = documents[i % len(documents)], i // len(documents)
            user = ("user", f"{document}\nQuestion {question}: {words(rng, 8)}?")
            yield chat([("system", system), user] if with_system else [user])

    def conversations() -> Iterator[dict[str, Any]]:
        for i in range(n):  # a few long conversations continued turn by turn, interleaved
            depth = 2 + (i // 64) % 12
            history = [("user" if t % 2 == 0 else "assistant", turns[(i % 64 + t) % 16]) for t in range(depth)]
            yield chat([("system", system), *history])

    return {
        "documents, interleaved": lambda: interleaved(False),
        "documents behind one system prompt": lambda: interleaved(True),
        "one system prompt, short questions": lambda: (
            chat([("system", system), ("user", words(rng, 10))]) for _ in range(n)),
        "short chats, nothing shared": lambda: (chat([("user", words(rng, 20))]) for _ in range(n)),
        "multi-turn conversations": conversations,
        "completions prompts (documents)": lambda: (
            {"model": "m", "prompt": f"{documents[i % 256]}\nQ{i // 256}: {words(rng, 8)}?"} for i in range(n)),
        "embeddings (no prompt: passed through)": lambda: (
            {"model": "m", "input": words(rng, 50)} for _ in range(n)),
    }


def cpu_seconds(run: Callable[[], object]) -> float:
    """CPU seconds of this process: on a shared machine, wall time would count the moments others ran."""
    began = time.process_time()
    run()
    return time.process_time() - began


WAYS = ("streamed", "held", "grouped")


def parse(way: str, lines: list[tuple[int, bytes]], read: Callable[[Any], Any], lookahead: int) -> None:
    requests: Iterator[Any] = requests_in(lines)
    if way == "held":
        requests = iter(list(requests))
    elif way == "grouped":
        requests = group_by_prefix(requests, read, lookahead)
    deque(requests, maxlen=0)


def measure(path: Path, lookahead: int, repeats: int) -> dict[str, Any]:
    """Each way's best CPU seconds per chunk, and every grouped − held pair, over `repeats` passes."""
    best: dict[str, list[float]] = {way: [] for way in WAYS}
    pairs: list[float] = []
    requests = 0
    for repeat in range(repeats):
        read = prompt_reader(itemgetter(2))  # one per pass over the batch, as the runner makes one per run
        lines = iter_raw_lines(path)
        chunk_no = 0
        while chunk := list(islice(lines, lookahead)):
            turn = (repeat + chunk_no) % len(WAYS)  # each way first, second and third in turn
            spent = {way: cpu_seconds(partial(parse, way, chunk, read, lookahead))
                     for way in (*WAYS[turn:], *WAYS[:turn])}
            if repeat == 0:
                requests += len(chunk)
                for way in WAYS:
                    best[way].append(spent[way])
            else:
                for way in WAYS:
                    best[way][chunk_no] = min(best[way][chunk_no], spent[way])
            pairs.append((spent["grouped"] - spent["held"]) / len(chunk))
            chunk_no += 1
    us = {way: sum(times) / requests * 1e6 for way, times in best.items()}
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    return {"parse_us": us["streamed"], "parse_held_us": us["held"], "parse_grouped_us": us["grouped"],
            "grouping_us": us["grouped"] - us["held"], "pairs_median_us": statistics.median(pairs) * 1e6,
            "pairs_middle_half_us": [quartiles[0] * 1e6, quartiles[2] * 1e6], "pairs": len(pairs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.grouping_speed", description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--requests", type=int, default=20_000, help="requests per shape")
    parser.add_argument("--lookahead", type=int, default=1024, help="the server's --prefix-lookahead")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default="",
                        help="only the shapes whose names contain one of these comma-separated words (default: all)")
    args = parser.parse_args(argv)
    chosen = {name: bodies for name, bodies in shapes(args.requests, args.seed).items()
              if not args.shapes or any(word.strip() in name for word in args.shapes.split(","))}
    if not chosen:
        parser.error(f"no shape matches --shapes {args.shapes!r}; the shapes: "
                     f"{', '.join(shapes(0, args.seed))}")

    results: dict[str, dict[str, Any]] = {}
    with workdir(args.keep, prefix="vllm-batch-grouping-") as scratch:
        for name, bodies in chosen.items():
            path = scratch / "input.jsonl"
            write_jsonl(path, ({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body} for i, body in enumerate(bodies())))
            say(f"{name}: {args.requests:,} requests, {path.stat().st_size / 2**20:.0f} MiB")
            results[name] = measure(path, args.lookahead, args.repeats)
            results[name]["met"] = results[name]["grouping_us"] <= TARGET_US
            path.unlink()

    print_table(f"Prefix grouping cost per request ({args.requests:,} requests per shape, lookahead "
                f"{args.lookahead}; CPU time; best of {args.repeats} per chunk)",
                ["shape", "parse µs", "parse, chunk held µs", "parse, grouped µs", "grouping µs",
                 "median of pairs", "middle half", f"≤ {TARGET_US} µs"],
                [[name, r["parse_us"], r["parse_held_us"], r["parse_grouped_us"], r["grouping_us"],
                  r["pairs_median_us"], "{:.2f} to {:.2f}".format(*r["pairs_middle_half_us"]),
                  "yes" if r["met"] else "NO"]
                 for name, r in results.items()])
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("keep", "no_json")},
               "results": results, "max_grouping_us": max(r["grouping_us"] for r in results.values()),
               "targets": {"grouping_us": TARGET_US, "met": all(r["met"] for r in results.values())}}
    if not args.no_json:
        say(f"wrote {write_results('grouping_speed', payload)}")
    return payload


if __name__ == "__main__":
    main()
