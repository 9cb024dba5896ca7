"""Crash cost: `kill -9` the server at random points of a running batch, restart it, and measure

- the work thrown away: results that had been produced (written to the output part) but not yet committed,
  so they are computed again after the restart. A checkpoint starts every interval (`--checkpoint-every`
  results, but at least 50 ms and at most `--checkpoint-seconds` of work) and commits in the background, so a
  kill loses what came since the last commit: about one interval on average, at most two plus what finished
  during one commit, plus the requests in flight (at most the window);
- the time from restart to resumed processing: process start → /health answers → the first new result is
  written → the first new result is committed (visible in `request_counts`).

At the end the batch must complete with exactly one result per request: nothing lost, nothing duplicated.

Two paces: the echo engine at full speed (an interval is then 50 ms of work) and a paced one that runs
slower than one interval's worth of results per second (the `--checkpoint-seconds` bound applies).

    python -m benchmarks.crash [--kills 6] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks._harness import (
    BatchAPI,
    Server,
    common_args,
    print_table,
    say,
    workdir,
    write_jsonl,
    write_results,
)
from benchmarks.pipeline import CHAT, chat_lines
from vllm_batch_server.queue.checkpoint import MIN_GAP_SECONDS

CHECKPOINT_EVERY = 500
CHECKPOINT_SECONDS = 1.0


@dataclass
class Pace:
    name: str
    lines: int
    echo_delay: float
    window: int
    kill_after: tuple[float, float]  # seconds of processing after (re)start before the kill, uniform


PACES = [
    Pace("full speed", 200_000, 0.0, 256, (0.1, 0.8)),
    Pace("paced", 12_000, 0.05, 16, (0.5, 3.0)),
]


def committed(db: Path, batch_id: str) -> tuple[int, int]:
    """(results committed, output byte offset committed), read straight from SQLite while the server is down."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT completed + failed, output_offset FROM batches WHERE id = ?",
                           (batch_id,)).fetchone()
    return int(row[0]), int(row[1])


def lines_in(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def first_line_after(path: Path, offset: int) -> bytes | None:
    """The complete line starting at `offset`, if there is one."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            line = fh.readline(1 << 20)
    except FileNotFoundError:
        return None
    return line if line.endswith(b"\n") else None


def restart(server: Server, api: BatchAPI, batch_id: str, part: Path, offset: int, done: int,
            stale: bytes | None) -> dict[str, float]:
    """Launch again and time the way back: healthy, writing new results, committing them."""
    server.launch()
    healthy = resumed = progress = None
    deadline = time.monotonic() + 120
    while progress is None and time.monotonic() < deadline:
        elapsed = time.monotonic() - server.started_at
        if resumed is None:
            # Resumed once a result past the committed offset exists that was not there before the kill
            # (result ids are random, so a recomputed line never equals the discarded one).
            line = first_line_after(part, offset)
            if line is not None and line != stale:
                resumed = elapsed
        if healthy is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.base_url + "/health", timeout=0.5).status_code == 200:
                    healthy = time.monotonic() - server.started_at
        elif resumed is not None:
            batch = api.batch(batch_id)
            counts = batch["request_counts"]
            if counts["completed"] + counts["failed"] > done or batch["status"] != "in_progress":
                progress = time.monotonic() - server.started_at
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"server died on restart:\n{server.log_tail()}")
        time.sleep(0.005)
    if progress is None or healthy is None or resumed is None:
        raise RuntimeError(f"no progress within 120 s after restart:\n{server.log_tail()}")
    return {"healthy_s": healthy, "resumed_s": resumed, "committed_s": progress}


def run_pace(scratch: Path, pace: Pace, kills: int, rng: random.Random) -> dict[str, Any]:
    source = scratch / f"input-{pace.lines}.jsonl"
    write_jsonl(source, chat_lines(pace.lines))
    data = scratch / f"data-{pace.name.replace(' ', '-')}"
    server = Server(data, extra_args=[
        "--echo-delay", str(pace.echo_delay), "--window", str(pace.window),
        "--checkpoint-every", str(CHECKPOINT_EVERY), "--checkpoint-seconds", str(CHECKPOINT_SECONDS),
        "--max-batch-lines", str(max(pace.lines, 50_000))])
    server.start()
    api = BatchAPI(server.base_url)
    events: list[dict[str, Any]] = []
    try:
        file_id = api.upload(source)
        batch_id = api.create_batch(file_id, CHAT)["id"]
        while api.batch(batch_id)["status"] == "validating":
            time.sleep(0.01)
        part = data / "batches" / batch_id / "output.jsonl.part"
        began = time.monotonic()
        for index in range(kills):
            time.sleep(rng.uniform(*pace.kill_after))
            ran = time.monotonic() - began
            server.kill()
            done, offset = committed(server.data_dir / "vllm-batch.sqlite3", batch_id)
            written = lines_in(part)
            if done >= pace.lines:
                say(f"{pace.name}: the batch finished before kill #{index + 1}; stopping the kills there")
                server.launch()
                server.wait_healthy()
                break
            # The rate since the last (re)start gives how many results one `--checkpoint-seconds` holds.
            prior = events[-1]["committed_at_kill"] if events else 0
            rate = max(0.0, (written - prior) / ran) if ran > 0 else 0.0
            # One interval: CHECKPOINT_EVERY results, but never less than MIN_GAP_SECONDS nor more than
            # CHECKPOINT_SECONDS of work.
            interval = (min(max(CHECKPOINT_EVERY, rate * MIN_GAP_SECONDS), rate * CHECKPOINT_SECONDS) if rate
                        else CHECKPOINT_EVERY)
            stale = first_line_after(part, offset)
            times = restart(server, api, batch_id, part, offset, done, stale)
            began = server.started_at + times["resumed_s"]
            event = {"kill": index + 1, "after_s": ran, "committed_at_kill": done, "written_at_kill": written,
                     "discarded": written - done, "interval_results": interval, "rate_rps": rate, **times}
            events.append(event)
            say(f"{pace.name} kill #{index + 1} after {ran:.2f} s: {done:,} committed, {written - done} "
                f"discarded (interval ≈ {interval:.0f}); healthy {times['healthy_s']:.2f} s, resumed "
                f"{times['resumed_s']:.2f} s, committed {times['committed_s']:.2f} s")
        final = api.wait(batch_id, poll=0.05)
        assert final["status"] == "completed", final
        out = scratch / "final.jsonl"
        api.download(final["output_file_id"], out)
        with open(out, "rb") as fh:
            custom_ids = [json.loads(raw)["custom_id"] for raw in fh]
        exact = len(custom_ids) == pace.lines and set(custom_ids) == {f"request-{i}" for i in range(pace.lines)}
        out.unlink()
    finally:
        api.close()
        server.kill()
    return {"pace": pace.name, "lines": pace.lines, "echo_delay": pace.echo_delay, "window": pace.window,
            "kills": events, "exactly_once": exact}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.crash", description=__doc__))
    parser.add_argument("--kills", type=int, default=6, help="kills per pace")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    results = []
    with workdir(args.keep) as scratch:
        for pace in PACES:
            results.append(run_pace(scratch, pace, args.kills, rng))

    rows = []
    within = True
    for result in results:
        kills = result["kills"]
        if not kills:
            continue
        worst = max(k["discarded"] - k["interval_results"] for k in kills)
        within = within and all(k["discarded"] <= k["interval_results"] + result["window"] for k in kills)
        rows.append([
            result["pace"], len(kills), statistics.mean(k["rate_rps"] for k in kills),
            statistics.mean(k["interval_results"] for k in kills),
            statistics.mean(k["discarded"] for k in kills), max(k["discarded"] for k in kills), worst,
            statistics.mean(k["discarded"] / k["rate_rps"] for k in kills if k["rate_rps"]),
            statistics.median(k["healthy_s"] for k in kills), statistics.median(k["resumed_s"] for k in kills),
            max(k["resumed_s"] for k in kills), statistics.median(k["committed_s"] for k in kills),
            "yes" if result["exactly_once"] else "NO",
        ])
    print_table(f"Crash cost: kill -9 at random points (checkpoint every {CHECKPOINT_EVERY} results or "
                f"{CHECKPOINT_SECONDS:g} s)",
                ["pace", "kills", "req/s", "interval", "mean lost", "max lost", "max - interval",
                 "lost work s", "healthy s", "resumed s", "max resumed s", "committed s", "exactly once"], rows)
    print("\nlost = results produced but not yet committed at the kill, so recomputed; interval = results in one "
          "checkpoint interval at that pace; lost work s = mean lost / req/s. Times are medians from restart.")
    payload = {"checkpoint_every": CHECKPOINT_EVERY, "checkpoint_seconds": CHECKPOINT_SECONDS, "seed": args.seed,
               "paces": results, "targets": {"within_one_interval": within,
                                             "exactly_once": all(r["exactly_once"] for r in results)}}
    if not args.no_json:
        say(f"wrote {write_results('crash', payload)}")
    return payload


if __name__ == "__main__":
    main()
