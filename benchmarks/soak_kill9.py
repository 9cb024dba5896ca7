"""Soak: `kill -9` the server at ≥ 50 random points of its life and count what the durability contract forbids.

The server runs the echo engine slowly enough that batches are always mid-flight. Each cycle it is killed at a
random moment — while batches run, while one is being uploaded, right after a cancel — then restarted, while
new batches keep arriving. At the end every batch must reach its terminal state, and we count:

- lost: a request of a completed batch with no line in its output or error file;
- duplicated: a custom_id with more than one line across a batch's two files;
- recomputed: requests the engine computed more than once (the echo engine's `journal=` fault option records
  every computation); the contract bounds this by one checkpoint interval plus the in-flight window per kill;
- corrupt: a result line that is not JSON, a registered file whose size differs from its row, or an
  acknowledged upload whose bytes changed;
- visible partial uploads: a file listed by the API that was never acknowledged to its uploader.

    python -m benchmarks.soak_kill9 [--kills 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks._harness import Server, common_args, print_table, say, workdir, write_results

ENDPOINT = "/v1/chat/completions"


@dataclass
class Submitted:
    batch_id: str
    prefix: str
    size: int
    cancelled: bool = False


@dataclass
class Tally:
    kills: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    recomputed: int = 0
    corrupt: int = 0
    visible_partial_uploads: int = 0
    wrong_terminal_state: int = 0
    requests: int = 0


def request_lines(prefix: str, n: int) -> bytes:
    lines = []
    for i in range(n):
        messages = [] if i % 11 == 0 else [{"role": "user", "content": f"{prefix} says {i}"}]
        lines.append({"custom_id": f"{prefix}-{i}", "method": "POST", "url": ENDPOINT,
                      "body": {"model": "echo-model", "messages": messages}})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def statuses(data_dir: Path) -> Counter[str]:
    with sqlite3.connect(data_dir / "vllm-batch.sqlite3") as conn:
        return Counter(row[0] for row in conn.execute("SELECT status FROM batches"))


def slow_upload(base_url: str, stop: threading.Event, acknowledged: list[str]) -> None:
    """Upload a file slowly enough to be killed in the middle; record its id only if the server answered."""
    boundary = "soakboundary"

    def body() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n\r\n"
               ).encode()
        for i in range(200):
            if stop.is_set():
                return
            yield request_lines(f"slow{i}", 20)
            time.sleep(0.01)
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = httpx.post(base_url + "/v1/files", content=body(), timeout=30,
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        if response.status_code == 200:
            acknowledged.append(response.json()["id"])
    except httpx.HTTPError:
        pass  # killed mid-upload: never acknowledged


def run(kills: int, seed: int, batch_size: int, keep: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    tally = Tally()
    submitted: list[Submitted] = []
    uploads: dict[str, str] = {}  # acknowledged file id -> sha256 of what was sent
    with workdir(keep, prefix="vllm-batch-soak-") as scratch:
        journal = scratch / "journal.txt"
        server = Server(scratch / "data", extra_args=[
            "--echo-delay", "0.004", "--window", "8", "--checkpoint-every", "20", "--checkpoint-seconds", "0.5",
            "--echo-fault", f"journal={journal}"])
        server.start()
        client = httpx.Client(base_url=server.base_url, timeout=30)
        started = time.monotonic()
        try:
            counter = 0
            while tally.kills < kills:
                # keep about two batches queued or running
                active = statuses(server.data_dir)
                waiting = active["validating"] + active["in_progress"]
                for _ in range(max(0, 2 - waiting)):
                    counter += 1
                    prefix = f"b{counter}"
                    data = request_lines(prefix, batch_size)
                    file_id = client.post("/v1/files", files={"file": ("in.jsonl", data)},
                                          data={"purpose": "batch"}).raise_for_status().json()["id"]
                    uploads[file_id] = hashlib.sha256(data).hexdigest()
                    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": ENDPOINT,
                                                             "completion_window": "24h"}).raise_for_status()
                    submitted.append(Submitted(batch.json()["id"], prefix, batch_size))
                time.sleep(rng.uniform(0.0, 1.2))
                kind = rng.choices(["running", "upload", "cancel"], weights=[7, 2, 1])[0]
                uploader = None
                stop_upload = threading.Event()
                acknowledged: list[str] = []
                if kind == "upload":
                    uploader = threading.Thread(target=slow_upload, args=(server.base_url, stop_upload,
                                                                          acknowledged))
                    uploader.start()
                    time.sleep(rng.uniform(0.05, 0.5))
                elif kind == "cancel":
                    candidates = [s for s in submitted if not s.cancelled]
                    if candidates:
                        target = rng.choice(candidates[-3:])
                        if client.post(f"/v1/batches/{target.batch_id}/cancel").status_code == 200:
                            target.cancelled = True
                at_kill = statuses(server.data_dir)
                kind = kind if kind != "running" or at_kill["in_progress"] else "idle"
                server.kill()
                tally.kills += 1
                tally.kinds[kind] += 1
                stop_upload.set()
                if uploader is not None:
                    uploader.join(30)
                server.start()
                # the slow upload was never acknowledged, so it must not be visible
                listed = {f["id"] for f in client.get("/v1/files", params={"purpose": "batch"}).json()["data"]}
                unexpected = listed - set(uploads) - set(acknowledged)
                tally.visible_partial_uploads += len(unexpected)
                for file_id in acknowledged:
                    uploads[file_id] = ""  # acknowledged just before the kill: it may stay, content unchecked
                if tally.kills % 10 == 0:
                    say(f"{tally.kills} kills, {len(submitted)} batches, {dict(statuses(server.data_dir))}")
            say("all kills done; waiting for every batch to end")
            for item in submitted:
                batch = wait_terminal(client, item.batch_id)
                check_batch(client, item, batch, tally)
            for file_id, digest in uploads.items():
                response = client.get(f"/v1/files/{file_id}/content")
                if response.status_code != 200 or (digest and hashlib.sha256(response.content).hexdigest()
                                                   != digest):
                    tally.corrupt += 1
            tally.recomputed = count_recomputed(journal)
        finally:
            client.close()
            server.kill()
    elapsed = time.monotonic() - started
    return {"kills": tally.kills, "kill_kinds": dict(tally.kinds), "batches": len(submitted),
            "requests": tally.requests, "lost": tally.lost, "duplicated": tally.duplicated,
            "recomputed": tally.recomputed, "corrupt": tally.corrupt,
            "visible_partial_uploads": tally.visible_partial_uploads,
            "wrong_terminal_state": tally.wrong_terminal_state, "seconds": round(elapsed, 1),
            "settings": {"seed": seed, "batch_size": batch_size, "checkpoint_every": 20, "window": 8,
                         "echo_delay": 0.004}}


def wait_terminal(client: httpx.Client, batch_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return dict(batch)
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch_id} never ended")


def check_batch(client: httpx.Client, item: Submitted, batch: dict[str, Any], tally: Tally) -> None:
    expected_status = "cancelled" if item.cancelled else "completed"
    # a cancel that raced the batch's completion legitimately leaves it completed
    if batch["status"] != expected_status and not (item.cancelled and batch["status"] == "completed"):
        tally.wrong_terminal_state += 1
    seen: Counter[str] = Counter()
    for key in ("output_file_id", "error_file_id"):
        if not batch[key]:
            continue
        meta = client.get(f"/v1/files/{batch[key]}").json()
        content = client.get(f"/v1/files/{batch[key]}/content").content
        if len(content) != meta["bytes"]:
            tally.corrupt += 1
        for raw in content.splitlines():
            try:
                seen[json.loads(raw)["custom_id"]] += 1
            except (ValueError, KeyError):
                tally.corrupt += 1
    expected = {f"{item.prefix}-{i}" for i in range(item.size)}
    tally.duplicated += sum(n - 1 for n in seen.values() if n > 1)
    tally.corrupt += len(set(seen) - expected)
    if batch["status"] == "completed":
        tally.lost += len(expected - set(seen))
        tally.requests += item.size
    counts = batch["request_counts"]
    if counts["completed"] + counts["failed"] != sum(seen.values()):
        tally.corrupt += 1


def count_recomputed(journal: Path) -> int:
    """Computations beyond the first of each request (ids are `<batch>-<line>`)."""
    counts = Counter(journal.read_text().split()) if journal.exists() else Counter()
    return sum(n - 1 for n in counts.values() if n > 1)


def main() -> None:
    parser = common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1500)
    args = parser.parse_args()
    result = run(args.kills, args.seed, args.batch_size, args.keep)
    print_table("kill -9 soak", ["measure", "value"], [
        ("kills", result["kills"]),
        ("  of which " + ", ".join(f"{k} {v}" for k, v in sorted(result["kill_kinds"].items())), ""),
        ("batches", result["batches"]),
        ("requests in completed batches", result["requests"]),
        ("lost", result["lost"]),
        ("duplicated", result["duplicated"]),
        ("recomputed", result["recomputed"]),
        ("corrupt", result["corrupt"]),
        ("visible partial uploads", result["visible_partial_uploads"]),
        ("wrong terminal state", result["wrong_terminal_state"]),
        ("seconds", result["seconds"]),
    ])
    if not args.no_json:
        say(f"wrote {write_results('soak_kill9', result)}")
    bad = result["lost"] + result["duplicated"] + result["corrupt"] + result["visible_partial_uploads"] + \
        result["wrong_terminal_state"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
