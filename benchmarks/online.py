"""Online requests on the batch engine (real vLLM): latency idle and under a saturating batch, by policy, and what
a light online load costs the batch.

One server per policy, each with `--online-model` so the model is loaded at start. A policy is `default` (no
flag: priority scheduling and the online latency controller, `--online-latency-target 2`), `target:X` (the
controller with `--online-latency-target X`), `priority` (priority scheduling alone: `--online-latency-target
0`), `fcfs` (`--no-priority-scheduling`, no controller), `narrow:N` (priority plus a fixed
`--online-batch-window N`), `headroom:K` (priority plus `--window max_num_seqs-K`: the batch never takes the
last K of vLLM's sequence slots, so an online request finds one free), or parts joined with `+`
(`headroom:4+narrow:16`). On each:

  idle     N online chat requests one after another on an otherwise idle engine (the controller's baseline);
  batch    a batch alone, sized to keep vLLM full (2 x max_num_seqs in flight): its output tokens/s;
  shared   the same batch again, with an online request every --online-interval seconds (or one after
           another, --online-pause apart) for as long as it runs: their latency under load, the batch's
           tokens/s beside them, the online load as a share of the batch's requests and of the engine's
           capacity, and the controller's state from /metrics at the end.

Online requests stream (the time to first token is the first content chunk), all requests are greedy with
`ignore_eos`, so every run generates exactly the same number of tokens. Latency is the client's view over
loopback HTTP, the batch's throughput is its output tokens over the time from creation to completion.

    python -m benchmarks.online [--batch-requests 512] [--online-requests 20] [--online-interval 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
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

CHAT = "/v1/chat/completions"
TARGET_LATENCY_RATIO = 2.0  # online e2e p50 while a batch runs, over idle p50
TARGET_BATCH_KEPT = 0.75  # batch throughput kept ...
TARGET_ONLINE_SHARE = 0.10  # ... beside a light online load: at most this many online requests per batch request
CONTROLLER_METRICS = ("vllm_batch_online_batch_window", "vllm_batch_online_batch_window_full",
                      "vllm_batch_online_controller_window", "vllm_batch_online_latency_target",
                      "vllm_batch_online_latency_ratio")


@dataclass
class Latency:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tokens: int = 0

    @staticmethod
    def _q(values: list[float], q: float) -> float | None:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    def summary(self) -> dict[str, Any]:
        return {"requests": len(self.e2e),
                "ttft_p50_s": self._q(self.ttft, 0.5), "ttft_p99_s": self._q(self.ttft, 0.99),
                "e2e_p50_s": self._q(self.e2e, 0.5), "e2e_p99_s": self._q(self.e2e, 0.99),
                "e2e_mean_s": statistics.fmean(self.e2e) if self.e2e else None}


def online_request(http: httpx.Client, model: str, max_tokens: int, n: int) -> tuple[float, float, int]:
    """One streamed chat request: (time to first content, end to end, output tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about number {n}."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first: float | None = None
    tokens = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"online request failed: {response.status_code} {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return first if first is not None else time.perf_counter() - began, time.perf_counter() - began, tokens


def run_online(http: httpx.Client, model: str, max_tokens: int, count: int | None,
               until: threading.Event | None = None, pause: float = 0.0) -> Latency:
    latency = Latency()
    n = 0
    while (count is None or n < count) and not (until is not None and until.is_set()):
        ttft, e2e, tokens = online_request(http, model, max_tokens, n)
        if until is not None and until.is_set():
            break  # it ended after the batch: not a measurement under load
        latency.ttft.append(ttft)
        latency.e2e.append(e2e)
        latency.tokens += tokens
        n += 1
        if pause:
            time.sleep(pause)
    return latency


def run_online_paced(base_url: str, model: str, max_tokens: int, interval: float,
                     until: threading.Event) -> Latency:
    """An open-loop online load: a request every `interval` seconds whether or not the last one has ended (the
    same offered load under every policy), until `until`; answers that end after it are not counted."""
    latency = Latency()
    lock = threading.Lock()

    def one(n: int) -> None:
        with httpx.Client(base_url=base_url, timeout=3600) as http:
            ttft, e2e, tokens = online_request(http, model, max_tokens, n)
        if until.is_set():
            return
        with lock:
            latency.ttft.append(ttft)
            latency.e2e.append(e2e)
            latency.tokens += tokens

    threads: list[threading.Thread] = []
    n = 0
    while not until.wait(0 if n == 0 else interval):
        thread = threading.Thread(target=one, args=(n,))
        thread.start()
        threads.append(thread)
        n += 1
    for thread in threads:
        thread.join()
    return latency


def batch_lines(model: str, count: int, max_tokens: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"b-{i}", "method": "POST", "url": CHAT,
             "body": {"model": model, "messages": [{"role": "user", "content": f"Write a story about item {i}."}],
                      "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}} for i in range(count)]


def run_batch(api: BatchAPI, file_id: str) -> tuple[float, dict[str, Any], float]:
    """(seconds from creation to completion, the batch, when it started running: perf_counter)."""
    began = time.perf_counter()
    created = api.create_batch(file_id, CHAT)
    running_at = began
    while True:
        batch = api.batch(created["id"])
        if batch["status"] == "in_progress" and running_at == began:
            running_at = time.perf_counter()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.1)
    if batch["status"] != "completed" or batch["request_counts"]["failed"]:
        raise RuntimeError(f"batch ended {batch['status']}: {batch.get('request_counts')} {batch.get('errors')}")
    return time.perf_counter() - began, batch, running_at


def policy_args(name: str, max_num_seqs: int) -> list[str]:
    """The server flags of a policy spec (see the module's doc)."""
    parts = name.split("+")
    kinds = {part.partition(":")[0] for part in parts}
    extra = ["--no-priority-scheduling" if "fcfs" in kinds else "--priority-scheduling"]
    if kinds & {"priority", "fcfs"}:
        extra += ["--online-latency-target", "0"]
    for part in parts:
        kind, _, value = part.partition(":")
        if kind == "narrow":
            extra += ["--online-batch-window", value]
        elif kind == "headroom":
            extra += ["--window", str(max_num_seqs - int(value))]
        elif kind == "target":
            extra += ["--online-latency-target", value]
        elif kind not in ("default", "priority", "fcfs"):
            raise SystemExit(f"unknown policy {part!r}: expected default, target:X, priority, fcfs, narrow:N or "
                             "headroom:K")
    return extra


def controller_state(base_url: str) -> dict[str, Any]:
    """The controller's gauges and decisions, as /metrics shows them."""
    state: dict[str, Any] = {"decisions": {}}
    for line in httpx.get(base_url + "/metrics", timeout=60).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in CONTROLLER_METRICS:
            state[name.removeprefix("vllm_batch_online_")] = float(value)
        elif name.startswith("vllm_batch_online_window_changes_total{"):
            state["decisions"][name.split('"')[1]] = float(value)
    return state


def measure_server(args: argparse.Namespace, scratch: Path, name: str, input_path: Path,
                   batch_alone: bool) -> dict[str, Any]:
    extra = ["--online-model", args.model, "--max-num-seqs", str(args.max_num_seqs),
             "--max-model-len", str(args.max_model_len), *policy_args(name, args.max_num_seqs)]
    if args.engine == "echo":  # a quick dry run of this script: steps whose cost grows with the batch, as here
        extra = [*extra[:4], "--echo-step-seconds", "0.004", "--echo-step-seconds-per-request", "0.001",
                 *extra[6:]]
    folder = name.replace(":", "-").replace("+", "_")
    server = Server(scratch / f"data-{folder}", engine=args.engine, models=[args.model], extra_args=extra)
    say(f"[{name}] starting the server (loads {args.model})")
    server.start(timeout=900)
    out: dict[str, Any] = {}
    api = BatchAPI(server.base_url)
    http = httpx.Client(base_url=server.base_url, timeout=3600)
    try:
        deadline = time.monotonic() + 900
        while http.get("/health", timeout=60).json()["loaded_model"] != args.model:  # a busy machine is slow
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model did not load; log tail:\n{server.log_tail()}")
            time.sleep(0.5)
        run_online(http, args.model, args.online_max_tokens, 3)  # warm-up
        file_id = api.upload(input_path)
        total_tokens = args.batch_requests * args.batch_max_tokens

        say(f"[{name}] idle: {args.online_requests} online requests one after another")
        out["idle"] = run_online(http, args.model, args.online_max_tokens, args.online_requests).summary()

        if batch_alone:
            say(f"[{name}] batch alone: {args.batch_requests} x {args.batch_max_tokens} tokens")
            seconds, _, _ = run_batch(api, file_id)
            out["batch_alone"] = {"seconds": seconds, "output_tokens_per_s": total_tokens / seconds}

        say(f"[{name}] shared: the batch again, online requests alongside while it runs")
        ended = threading.Event()
        measured: dict[str, Any] = {}

        def batch_thread() -> None:
            own = BatchAPI(server.base_url)  # an httpx client per thread
            try:
                seconds, batch, _ = run_batch(own, file_id)
                measured["seconds"] = seconds
                measured["id"] = batch["id"]
            finally:
                own.close()
                ended.set()

        thread = threading.Thread(target=batch_thread)
        thread.start()
        # Online traffic begins once the batch has filled the engine (its first results are in).
        while not ended.is_set():
            listed = api.client.get("/v1/batches", params={"limit": 1}).json()["data"]
            if listed and listed[0]["status"] == "in_progress" and listed[0]["request_counts"]["completed"] > 0:
                break
            time.sleep(0.2)
        load_began = time.perf_counter()
        if args.online_interval > 0:
            shared = run_online_paced(server.base_url, args.model, args.online_max_tokens, args.online_interval,
                                      ended)
        else:
            shared = run_online(http, args.model, args.online_max_tokens, None, until=ended,
                                pause=args.online_pause)
        load_seconds = time.perf_counter() - load_began
        thread.join()
        out["shared"] = {**shared.summary(), "batch_seconds": measured["seconds"],
                         "batch_output_tokens_per_s": total_tokens / measured["seconds"],
                         "online_output_tokens_per_s": shared.tokens / load_seconds if load_seconds else 0.0,
                         "online_request_share": len(shared.e2e) / args.batch_requests}
        out["controller"] = controller_state(server.base_url)
    finally:
        http.close()
        api.close()
        server.stop()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.online", description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="vllm", choices=("vllm", "echo"),
                        help="echo: a quick dry run of the script itself (--model echo-model)")
    parser.add_argument("--batch-requests", type=int, default=512)
    parser.add_argument("--batch-max-tokens", type=int, default=64)
    parser.add_argument("--online-requests", type=int, default=20, help="idle measurements per server")
    parser.add_argument("--online-max-tokens", type=int, default=16)
    parser.add_argument("--online-interval", type=float, default=5.0,
                        help="while the batch runs, start an online request every this many seconds, whether or "
                        "not the last one has ended (the same load under every policy); 0: one after another, "
                        "--online-pause apart")
    parser.add_argument("--online-pause", type=float, default=0.0,
                        help="with --online-interval 0: seconds between one online answer and the next request")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--policies", default="default,priority,narrow:8",
                        help="comma-separated policy specs: default, target:X, priority, fcfs, narrow:N, "
                        "headroom:K, joined with +")
    parser.add_argument("--skip-batch-alone", action="store_true", help="measure the batch alone on the first "
                        "policy's server only (the engine and the batch are the same on all)")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    with workdir(args.keep, prefix="vllm-batch-online-") as scratch:
        input_path = scratch / "batch.jsonl"
        write_jsonl(input_path, batch_lines(args.model, args.batch_requests, args.batch_max_tokens))
        for n, policy in enumerate(p.strip() for p in args.policies.split(",") if p.strip()):
            results[policy] = measure_server(args, scratch, policy, input_path,
                                             batch_alone=n == 0 or not args.skip_batch_alone)
            say(f"[{policy}] {json.dumps(results[policy])}")  # kept in the log should a later server fail

    rows = []
    for policy, r in results.items():
        for scenario in ("idle", "shared"):
            s = r[scenario]
            rows.append([f"{policy} {scenario}", s["requests"], s["ttft_p50_s"], s["ttft_p99_s"], s["e2e_p50_s"],
                         s["e2e_p99_s"]])
    print_table("Online latency (seconds; streamed chat, "
                f"{args.online_max_tokens} tokens)", ["scenario", "n", "ttft p50", "ttft p99", "e2e p50",
                                                      "e2e p99"], rows)
    reference = next((r["batch_alone"]["output_tokens_per_s"] for r in results.values() if "batch_alone" in r), None)
    rows = []
    for policy, r in results.items():
        alone = r.get("batch_alone", {}).get("output_tokens_per_s", reference)
        shared = r["shared"]["batch_output_tokens_per_s"]
        share = r["shared"]["online_output_tokens_per_s"] / alone if alone else None
        rows.append([policy, alone, shared, shared / alone if alone else None, share,
                     r["shared"]["online_request_share"]])
    print_table("Batch throughput (output tokens/s)", ["policy", "alone", "with online", "kept",
                                                       "online tok share", "online req share"], rows)
    print_table("Controller at the end of the shared run (/metrics)",
                ["policy", "window", "full", "learned", "target", "ratio", "decisions"],
                [[policy, c.get("batch_window"), c.get("batch_window_full"), c.get("controller_window"),
                  c.get("latency_target"), c.get("latency_ratio"),
                  " ".join(f"{k}={v:g}" for k, v in c["decisions"].items() if v)]
                 for policy, r in results.items() for c in [r["controller"]]])

    ratios: dict[str, Any] = {}
    for policy, r in results.items():
        idle, shared = r["idle"], r["shared"]
        ratios[policy] = {
            "e2e_p50_shared_over_idle": shared["e2e_p50_s"] / idle["e2e_p50_s"] if shared["e2e_p50_s"] else None,
            "ttft_p50_shared_over_idle": shared["ttft_p50_s"] / idle["ttft_p50_s"] if shared["ttft_p50_s"] else None,
        }
        alone = r.get("batch_alone", {}).get("output_tokens_per_s", reference)
        ratios[policy]["online_request_share"] = shared["online_request_share"]
        if alone:
            ratios[policy]["batch_kept"] = shared["batch_output_tokens_per_s"] / alone
            ratios[policy]["online_share"] = shared["online_output_tokens_per_s"] / alone
    targets: dict[str, Any] = {}
    for policy, p in ratios.items():
        light = p["online_request_share"] <= TARGET_ONLINE_SHARE
        met = {"latency_met": (p["e2e_p50_shared_over_idle"] or 99) <= TARGET_LATENCY_RATIO and light}
        if "batch_kept" in p:
            met["batch_kept_met"] = p["batch_kept"] >= TARGET_BATCH_KEPT and light
        targets[policy] = met
    print_table("Ratios", ["policy", "e2e p50 shared/idle", "ttft p50 shared/idle", "batch kept",
                           "online tok share", "online req share"],
                [[k, v["e2e_p50_shared_over_idle"], v["ttft_p50_shared_over_idle"], v.get("batch_kept"),
                  v.get("online_share"), v["online_request_share"]] for k, v in ratios.items()])
    payload = {"settings": vars(args), "results": results, "ratios": ratios, "targets": targets}
    if not args.no_json:
        say(f"results in {write_results('online', payload)}")
    return payload


if __name__ == "__main__":
    main()
