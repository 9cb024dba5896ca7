"""What prefix grouping costs the runner per request, on input shapes that exercise it.

For each shape, a JSONL batch file is read the way the runner reads it (`iter_requests`: read, parse) three
ways: streamed; in chunks of `--lookahead` parsed requests held in memory (what any look-ahead costs: a chunk
of long prompts no longer fits the CPU's caches); and through `group_by_prefix(..., prompt_parts, lookahead)`.
Grouping's cost per request is the difference between the last two (taking each prompt's parts, sorting the
chunk, handing it out): the median over `--repeats` back-to-back pairs, in CPU time (this process only: the
machine may be shared).

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
from itertools import islice
from pathlib import Path
from typing import Any

from benchmarks._harness import common_args, print_table, say, workdir, write_jsonl, write_results
from benchmarks._workloads import WORDS
from vllm_batch_server.grouping import group_by_prefix, prompt_parts
from vllm_batch_server.jsonl import iter_requests

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


def key(request: tuple[int, str, dict[str, Any]]) -> list[str] | None:
    return prompt_parts(request[2])


def timed(run: Callable[[], object]) -> float:
    """CPU seconds of this process: on a shared machine, wall time would count the moments others ran."""
    began = time.process_time()
    run()
    return time.process_time() - began


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

            def read(file: Path = path) -> float:
                return timed(lambda: deque(iter_requests(file), maxlen=0))

            def read_in_chunks(file: Path = path) -> float:
                def chunks() -> None:
                    source = iter_requests(file)
                    while chunk := list(islice(source, args.lookahead)):
                        deque(chunk, maxlen=0)
                return timed(chunks)

            def read_and_group(file: Path = path) -> float:
                return timed(lambda: deque(group_by_prefix(iter_requests(file), key, args.lookahead), maxlen=0))

            runs: dict[str, list[float]] = {"read": [], "chunks": [], "grouped": []}
            costs = []
            for repeat in range(args.repeats):  # interleaved, so a busy moment hits all alike
                runs["read"].append(read())
                if repeat % 2:  # each pair in both orders, so neither always runs on a warmer cache
                    runs["grouped"].append(read_and_group())
                    runs["chunks"].append(read_in_chunks())
                else:
                    runs["chunks"].append(read_in_chunks())
                    runs["grouped"].append(read_and_group())
                costs.append(runs["grouped"][-1] - runs["chunks"][-1])
            us = {name: min(values) / args.requests * 1e6 for name, values in runs.items()}
            # The median of the paired differences: steadier than the difference of two minima, whose noises
            # add up.
            cost = statistics.median(costs) / args.requests * 1e6
            results[name] = {"read_us": us["read"], "read_in_chunks_us": us["chunks"],
                             "read_and_group_us": us["grouped"], "grouping_us": cost,
                             "grouping_us_best_of": us["grouped"] - us["chunks"],
                             "grouping_us_spread": [min(costs) / args.requests * 1e6,
                                                    max(costs) / args.requests * 1e6],
                             "grouping_us_each": [c / args.requests * 1e6 for c in costs], "met": cost <= TARGET_US}
            path.unlink()

    print_table(f"Prefix grouping cost per request ({args.requests:,} requests per shape, lookahead "
                f"{args.lookahead}; CPU time, best of {args.repeats}; grouping: median of the paired differences)",
                ["shape", "read µs", "read, chunks held µs", "read, grouped µs", "grouping µs", "pairs' range",
                 "best-of difference", f"≤ {TARGET_US} µs"],
                [[name, r["read_us"], r["read_in_chunks_us"], r["read_and_group_us"], r["grouping_us"],
                  "{:.1f} to {:.1f}".format(*r["grouping_us_spread"]), r["grouping_us_best_of"],
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
