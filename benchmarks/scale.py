"""Many backends behind one server: how throughput scales, what losing one costs, what prefix affinity buys.

  scaling   echo backends (separate processes) with a fixed delay per request and a fixed window each; the
            server routes one batch over 1, 2, 4, 8 of them. Target: throughput with k backends ≥ 0.9 × k × the
            throughput with one (and near k × window / delay, what the backends can do at most).
  loss      4 echo backends; one is killed (kill -9) 40% into the batch. Counted: requests the dead backend had
            started and another backend then computed (target: ≤ its window), and the batch's time against a
            run without the kill and against losing a quarter of the capacity for the rest of the batch.
  affinity  two real vLLM OpenAI servers (CPU build, one core each) and a shared-document workload (each
            document asked several questions, the file written question by question): the share of prompt
            tokens served from vLLM's prefix cache and the batch's time, with prefix affinity and without
            (`--no-prefix-affinity`). The documents together are larger than one backend's KV cache and
            smaller than two. By default the runner's own grouping is off (`--prefix-lookahead 0`), so a
            document's questions reach the router apart in time, as they do when they come in different
            batches; `--prefix-lookahead 1024` measures both together. Real engines: run it under
            `flock /work/vllm.lock` on a shared machine.

    python -m benchmarks.scale [--parts scaling,loss] [--counts 1,2,4,8] [--delay 0.5] [--window 16]
    python -m benchmarks.scale --parts affinity [--documents 40] [--questions 3] [--doc-words 600]
                                                [--prefix-lookahead 0]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    BatchAPI,
    Server,
    common_args,
    cpu_seconds,
    print_table,
    say,
    workdir,
    write_jsonl,
    write_results,
)

# The backends' processes, shared with the router's tests (the echo backend itself lives there too).
from tests.helpers.backends import Backend, echo, running, vllm_serve

CHAT = "/v1/chat/completions"
TARGET_SCALING = 0.9


def echo_backend(directory: Path, name: str, delay: float) -> Backend:
    return echo(directory, name, "--delay", str(delay))


def router_server(directory: Path, backends: list[Backend], window: int, extra: list[str] | None = None,
                  models: list[str] | None = None) -> Server:
    args = ["--backend-probe-seconds", "1"]
    for backend in backends:
        args += ["--backend", f"{backend.url},window={window}"]
    return Server(directory, engine="http", models=models or [], extra_args=[*args, *(extra or [])])


def chat_lines(n: int, model: str = "echo-model") -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"custom_id": f"req-{i}", "method": "POST", "url": CHAT,
               "body": {"model": model, "messages": [{"role": "user", "content": f"message number {i}"}]}}


def run_batch(api: BatchAPI, path: Path, poll: float = 0.05) -> tuple[float, dict[str, Any]]:
    """Seconds from batch creation to completed, and the batch."""
    file_id = api.upload(path)
    began = time.perf_counter()
    batch = api.wait(api.create_batch(file_id, CHAT)["id"], poll=poll)
    elapsed = time.perf_counter() - began
    if batch["status"] != "completed":
        raise RuntimeError(f"batch ended {batch['status']}: {batch.get('errors')}")
    return elapsed, batch


# ---- scaling ------------------------------------------------------------------------------------------------


def scaling(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    rows, results = [], []
    one = None
    for count in args.counts:
        directory = scratch / f"scaling-{count}"
        directory.mkdir()
        n = args.per_backend * count
        path = directory / "input.jsonl"
        write_jsonl(path, chat_lines(n))
        with running([echo_backend(directory, f"b{i}", args.delay) for i in range(count)]) as backends:
            with router_server(directory / "data", backends, args.window).start() as server:
                api = BatchAPI(server.base_url)
                try:
                    cpu_before = cpu_seconds(server.pid)
                    seconds, _ = run_batch(api, path)
                    server_cpu = cpu_seconds(server.pid) - cpu_before
                finally:
                    api.close()
            per_backend = [sum(1 for e in b.events() if e["event"] == "done") for b in backends]
        rps = n / seconds
        one = one or rps / count
        ideal = count * args.window / args.delay
        result = {"backends": count, "requests": n, "seconds": seconds, "rps": rps, "vs_linear": rps / (one * count),
                  "vs_ideal": rps / ideal, "per_backend": per_backend,
                  "server_cpu_ms_per_request": server_cpu / n * 1e3}
        results.append(result)
        rows.append([count, n, seconds, rps, result["vs_linear"], result["vs_ideal"], min(per_backend),
                     max(per_backend), result["server_cpu_ms_per_request"]])
        say(f"{count} backend(s): {rps:.1f} req/s ({result['vs_linear']:.3f} × linear)")
    print_table(f"Throughput against echo backends ({args.delay:g} s per request, window {args.window} each)",
                ["backends", "requests", "seconds", "req/s", "× linear", "× ideal", "least", "most",
                 "server CPU ms/req"], rows)
    met = all(r["vs_linear"] >= TARGET_SCALING for r in results)
    return {"results": results, "met": met}


# ---- losing a backend ---------------------------------------------------------------------------------------


def loss(args: argparse.Namespace, scratch: Path, baseline_seconds: float | None) -> dict[str, Any]:
    count = 4
    directory = scratch / "loss"
    directory.mkdir()
    n = args.per_backend * count
    path = directory / "input.jsonl"
    write_jsonl(path, chat_lines(n))
    if baseline_seconds is None:
        base = [echo_backend(directory, f"base{i}", args.delay) for i in range(count)]
        with running(base) as backends, router_server(directory / "base-data", backends, args.window).start() as srv:
            api = BatchAPI(srv.base_url)
            try:
                baseline_seconds, _ = run_batch(api, path)
            finally:
                api.close()
    with running([echo_backend(directory, f"b{i}", args.delay) for i in range(count)]) as backends:
        with router_server(directory / "data", backends, args.window).start() as server:
            api = BatchAPI(server.base_url)
            try:
                file_id = api.upload(path)
                began = time.perf_counter()
                batch_id = api.create_batch(file_id, CHAT)["id"]
                while api.batch(batch_id)["request_counts"]["completed"] < n * 0.4:
                    time.sleep(0.02)
                killed_at = time.perf_counter() - began
                backends[0].kill()
                batch = api.wait(batch_id, poll=0.05)
                seconds = time.perf_counter() - began
            finally:
                api.close()
            log = server.log_path.read_text()
        if batch["status"] != "completed":
            raise RuntimeError(f"batch ended {batch['status']}: {batch.get('errors')}")
        dead = backends[0].events()
        started = {e["id"] for e in dead if e["event"] == "start"}
        answered = {e["id"] for e in dead if e["event"] == "done"}
        elsewhere = {e["id"] for b in backends[1:] for e in b.events() if e["event"] == "done"}
        recomputed = len((started - answered) & elsewhere)
        counts = batch["request_counts"]
    # Had the capacity dropped to 3/4 at the kill with nothing lost, the rest would take 4/3 as long.
    expected = killed_at + (baseline_seconds - killed_at) * count / (count - 1)
    result = {"backends": count, "requests": n, "window": args.window, "killed_at_s": killed_at,
              "seconds": seconds, "baseline_seconds": baseline_seconds, "expected_seconds": expected,
              "recomputed": recomputed, "moved_logged": log.count("go to the others"),
              "completed": counts["completed"], "failed": counts["failed"],
              "met": recomputed <= args.window and counts["completed"] == n}
    print_table("Losing one of 4 echo backends 40% into a batch", ["what", "value"], [
        ["requests (all completed, each once)", f"{counts['completed']:,} of {n:,}"],
        ["recomputed (started on the dead backend, finished elsewhere)", recomputed],
        ["its window", args.window],
        ["batch seconds, no backend lost", baseline_seconds],
        ["batch seconds, one killed", seconds],
        ["expected if a quarter of the capacity went at the kill", expected],
    ])
    return result


# ---- prefix affinity on real vLLM backends ------------------------------------------------------------------


WORDS = (
    "the", "river", "kernel", "garden", "market", "signal", "planet", "engine", "letter", "bridge", "harvest",
    "window", "forest", "ticket", "village", "doctor", "silver", "winter", "summer", "ocean", "mountain", "station",
    "library", "museum", "theory", "battery", "compiler", "orchestra", "glacier", "volcano", "satellite", "bakery",
)


def documents_workload(path: Path, args: argparse.Namespace, seed: int, model: str) -> int:
    """Documents asked several questions each, interleaved question by question (the runner groups them)."""
    rng = random.Random(seed)
    documents = [f"Document {seed}-{d}. " + " ".join(rng.choice(WORDS) for _ in range(args.doc_words))
                 for d in range(args.documents)]
    lines = []
    for q in range(args.questions):
        for d, doc in enumerate(documents):
            lines.append({"custom_id": f"d{d}-q{q}", "method": "POST", "url": CHAT, "body": {
                # Output lengths vary, so requests finish one by one rather than a whole engine step at once
                # (slots freeing together would keep a document's questions together by accident).
                "model": model, "max_tokens": rng.randint(*args.out_tokens), "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"{doc}\n\nQuestion {q}: what does it say about "
                                                         f"{rng.choice(WORDS)}?"}]}})
    return write_jsonl(path, lines)


def vllm_backend(directory: Path, name: str, model_path: str, served: str, args: argparse.Namespace,
                 core: int | None) -> Backend:
    # One core each, as two machines would have their own.
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(core)} if core is not None else {}
    return vllm_serve(directory, name, model_path, served, max_model_len=args.max_model_len,
                      kv_cache_gib=args.kv_cache_gib, env=env)


def affinity(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.settings import default_cache_dir

    served = "smollm2-135m-instruct"
    model_path = model_files.resolve(served, Path(os.environ.get("BATCH_SERVER_MODEL_CACHE_DIR") or
                                             default_cache_dir())).path
    directory = scratch / "affinity"
    directory.mkdir()
    cores = os.cpu_count() or 1
    backends = [vllm_backend(directory, f"vllm{i}", model_path, served, args, i % cores if cores > 1 else None)
                for i in range(2)]
    rows, results = [], {}
    with running(backends, timeout=900) as live:
        say("two vLLM backends ready")
        # Each run gets documents of its own (a different seed), so neither finds the other's in the cache.
        lookahead = ["--prefix-lookahead", str(args.prefix_lookahead)]
        for seed, (label, extra) in enumerate((("without affinity", [*lookahead, "--no-prefix-affinity"]),
                                               ("with affinity", lookahead))):
            path = directory / f"input-{seed}.jsonl"
            n = documents_workload(path, args, seed, served)
            with router_server(directory / f"data-{seed}", live, args.vllm_window, extra, [served]).start() as srv:
                api = BatchAPI(srv.base_url)
                try:
                    seconds, batch = run_batch(api, path, poll=0.25)
                finally:
                    api.close()
            usage = batch["usage"]
            cached = usage["input_tokens_details"]["cached_tokens"] / max(1, usage["input_tokens"])
            results[label] = {"requests": n, "seconds": seconds, "input_tokens": usage["input_tokens"],
                              "cached_tokens": usage["input_tokens_details"]["cached_tokens"], "cached": cached}
            rows.append([label, n, usage["input_tokens"], cached, seconds, n / seconds])
            say(f"{label}: {cached:.0%} of prompt tokens cached, {seconds:.0f} s")
    print_table(f"Prefix affinity on two vLLM backends ({args.documents} documents of {args.doc_words} words × "
                f"{args.questions} questions, --prefix-lookahead {args.prefix_lookahead})",
                ["routing", "requests", "prompt tokens", "cached", "seconds", "req/s"], rows)
    on, off = results["with affinity"], results["without affinity"]
    return {"results": results, "cached_gain": on["cached"] - off["cached"], "speedup": off["seconds"] / on["seconds"]}


def main(argv: list[str]) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--parts", default="scaling,loss", help="scaling, loss, affinity (real vLLM)")
    parser.add_argument("--counts", default="1,2,4,8", help="numbers of echo backends")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds an echo backend takes per request")
    parser.add_argument("--window", type=int, default=16, help="requests in flight per echo backend")
    parser.add_argument("--per-backend", type=int, default=320, help="requests per echo backend in a batch")
    # 40 documents of ~650 tokens: 26,000 tokens, more than one backend's 1 GiB KV cache (~23,000 tokens of
    # SmolLM2 in float32) and less than two.
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--doc-words", type=int, default=600)
    parser.add_argument("--out-tokens", default="4-24", help="output tokens per request: a range MIN-MAX")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--vllm-window", type=int, default=32, help="requests in flight per vLLM backend")
    parser.add_argument("--prefix-lookahead", type=int, default=0,
                        help="the routing server's --prefix-lookahead for the affinity part (0: the runner keeps "
                        "the file's order, so only the router can keep a document's questions together)")
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",")]
    low, _, high = args.out_tokens.partition("-")
    args.out_tokens = (int(low), int(high or low))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    payload: dict[str, Any] = {"parameters": {k: v for k, v in vars(args).items() if k not in ("keep",)}}
    with workdir(args.keep, prefix="vllm-batch-scale-") as scratch:
        if "scaling" in parts:
            payload["scaling"] = scaling(args, scratch)
        if "loss" in parts:
            four = next((r for r in payload.get("scaling", {}).get("results", []) if r["backends"] == 4), None)
            same_size = four is not None and four["requests"] == args.per_backend * 4
            payload["loss"] = loss(args, scratch, four["seconds"] if four and same_size else None)
        if "affinity" in parts:
            payload["affinity"] = affinity(args, scratch)
    payload["targets"] = {"scaling_met": payload.get("scaling", {}).get("met"),
                          "loss_met": payload.get("loss", {}).get("met")}
    if not args.no_json:
        write_results("scale", payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
