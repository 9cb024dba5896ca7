"""End-to-end throughput, side by side on the same JSONL, the same machine, the same engine settings:

  (a) offline  vLLM's `LLM.chat` / `LLM.embed` over the whole list: the raw engine, no server, no files;
  (b) run-batch `python -m vllm.entrypoints.openai.run_batch -i IN -o OUT` (vLLM's own batch runner);
  (c) server   our server from upload to downloaded output (queueing, validation, checkpoints, files).

Engine start-up is excluded from every system: (a) times only the `LLM.chat` call after a warm-up, (c) runs on a
warm server (a one-line batch loads the model first), and (b) is timed from its "Reading batch" log line to
its exit (its total wall time, start-up included, is reported too). All three get the same dtype, eager mode,
`max_num_seqs`, `max_num_batched_tokens`, prefix caching and `VLLM_CPU_KVCACHE_SPACE`; requests are greedy
with `ignore_eos` so every system generates exactly the same number of tokens (`--natural` lets them stop).

Workloads: short chats; a long shared system prompt with short user turns (prefix-cache heavy); mixed prompt
and output lengths; embeddings. Plus the prefix-grouping experiment: many long documents, each asked a few
questions, interleaved, on our server in the file's order (`--prefix-lookahead 0`) and grouped (the default).

    python -m benchmarks.throughput [--requests 128] [--model NAME] [--workloads short,prefix,mixed,embed]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    REPO,
    RESULTS_DIR,
    BatchAPI,
    Server,
    common_args,
    print_table,
    round_trip,
    say,
    workdir,
    write_jsonl,
    write_results,
)

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
TARGET_VS_OFFLINE = 0.97
TARGET_VS_RUN_BATCH = 1.0

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her they this have are which be one had "
    "not but what all were when there can an your more if out so said about their will up time other new "
    "some could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came "
    "right used take three river battery kernel garden market signal planet engine letter bridge harvest "
    "window forest ticket village doctor silver winter summer ocean mountain station library museum theory"
)
WORDS = _VOCABULARY.split()
TOPICS = ["rivers", "batteries", "compilers", "gardens", "markets", "planets", "bridges", "forests", "museums",
          "trains", "libraries", "volcanoes", "bakeries", "satellites", "glaciers", "orchestras"]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Workload:
    name: str
    endpoint: str
    model: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def write(self, path: Path) -> Path:
        write_jsonl(path, ({"custom_id": f"{self.name}-{i}", "method": "POST", "url": self.endpoint,
                            "body": body} for i, body in enumerate(self.bodies)))
        return path


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int, natural: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if not natural:
        body["ignore_eos"] = True
    return body


def build_workloads(args: argparse.Namespace) -> dict[str, Workload]:
    rng = random.Random(args.seed)
    n, model = args.requests, args.model
    out: dict[str, Workload] = {}
    out["short"] = Workload("short", CHAT, model, [chat_body(model, [
        {"role": "user", "content": f"Write one sentence about {rng.choice(TOPICS)}: {text(rng, rng.randint(8, 24))}"}
    ], args.max_tokens, args.natural) for _ in range(n)], f"user turns of 10-30 words, {args.max_tokens} tokens out")

    system = f"You are a support agent. Follow these policies exactly. {text(rng, args.prefix_words)}"
    out["prefix"] = Workload("prefix", CHAT, model, [chat_body(model, [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Question {i}: {text(rng, rng.randint(6, 14))}?"},
    ], 32, args.natural) for i in range(n)], f"one {args.prefix_words}-word system prompt, short user turns, 32 out")

    mixed = []
    for _ in range(n):
        words = rng.choice([10, 40, 120, 300])
        mixed.append(chat_body(model, [{"role": "user", "content": text(rng, words)}],
                               rng.choice([8, 16, 32, 64, 96]), args.natural))
    out["mixed"] = Workload("mixed", CHAT, model, mixed, "prompts of 10-300 words, 8-96 tokens out")

    out["embed"] = Workload("embed", EMBEDDINGS, args.embed_model, [
        {"model": args.embed_model, "input": text(rng, rng.randint(5, 120))} for _ in range(args.embed_requests)],
        "one input of 5-120 words per request")

    # Prefix grouping: many long documents, each asked several questions, interleaved question by question (as
    # such files are often built), so that the documents outgrow the KV cache before their next question. Run
    # on two fresh servers: one keeping the file's order (--prefix-lookahead 0), one grouping (the default).
    documents = [f"Document {d}. {text(rng, args.prefix_words)}" for d in range(args.documents)]
    asked = [chat_body(model, [{"role": "user", "content": f"{documents[d]}\nQuestion {q}: {text(rng, 8)}?"}],
                       16, args.natural) for q in range(args.questions) for d in range(args.documents)]
    shape = f"{args.documents} documents of {args.prefix_words} words × {args.questions} questions, interleaved"
    out["documents-file-order"] = Workload("documents-file-order", CHAT, model, asked, shape)
    out["documents-grouped"] = Workload("documents-grouped", CHAT, model, asked, shape)
    return out


def warmup_body(body: dict[str, Any]) -> dict[str, Any]:
    """A request like `body` that shares no prompt prefix with it (a warm-up must not pre-fill the cache)."""
    body = json.loads(json.dumps(body))
    if "messages" in body:
        first = body["messages"][0]
        first["content"] = "Warm-up request, ignore. " + first["content"]
    else:
        body["input"] = "Warm-up request, ignore."
    return body


# ---- the three systems -------------------------------------------------------------------------------------


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": args.dtype, "enforce_eager": args.enforce_eager,
                              "max_num_seqs": args.max_num_seqs,
                              "max_num_batched_tokens": args.max_num_batched_tokens}
    if not args.prefix_caching:
        # Only ever forced off, as our server does: left unset, vLLM turns it on for the decoders that support
        # it and off for encoder-only embedding models (which refuse to start with it forced on).
        kwargs["enable_prefix_caching"] = False
    return kwargs


def resolve(name: str) -> str:
    """A model name as the server knows it → what vLLM loads (the embedded defaults live in a cache folder)."""
    from vllm_batch_server import models
    from vllm_batch_server.settings import default_cache_dir

    return models.resolve(name, Path(os.environ.get("BATCH_SERVER_MODEL_CACHE_DIR") or default_cache_dir())).path


def run_offline(args: argparse.Namespace, scratch: Path, kind: str, model: str,
                inputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    out = scratch / f"offline-{kind}.json"
    say(f"(a) offline LLM: {model}, {len(inputs)} workload(s)")
    command = [sys.executable, "-m", "benchmarks._offline", "--model", resolve(model), "--kind", kind,
               "--out", str(out), "--engine-json", json.dumps(engine_kwargs(args)), *map(str, inputs.values())]
    with open(scratch / f"offline-{kind}.log", "wb") as log:
        proc = subprocess.run(command, cwd=REPO, env=vllm_env(args), stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"offline run failed; see {scratch / f'offline-{kind}.log'}:\n"
                           + (scratch / f"offline-{kind}.log").read_text(errors="replace")[-3000:])
    report = json.loads(out.read_text())
    by_path = report.pop("results")
    return {name: {**by_path[str(path)], "engine": report} for name, path in inputs.items()}


def run_batch_cli(args: argparse.Namespace, scratch: Path, name: str, model: str, source: Path) -> dict[str, Any]:
    """vLLM's run_batch as a user runs it; timed from its 'Reading batch' log line to its exit."""
    say(f"(b) vLLM run_batch: {name}")
    output = scratch / f"run-batch-{name}.out.jsonl"
    kw = engine_kwargs(args)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source), "-o", str(output),
               "--model", resolve(model), "--served-model-name", model, "--dtype", kw["dtype"],
               "--max-num-seqs", str(kw["max_num_seqs"]),
               "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]),
               "--enable-prompt-tokens-details"]
    if "enable_prefix_caching" in kw:
        command.append("--no-enable-prefix-caching")
    if kw["enforce_eager"]:
        command.append("--enforce-eager")
    if source.read_text().count(EMBEDDINGS) and "--runner" not in command:
        command += ["--runner", "pooling"]
    log_path = scratch / f"run-batch-{name}.log"
    began = time.perf_counter()
    reading: list[float] = []
    writing: list[float] = []  # all results are in: what is left is writing the file and shutting down
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=scratch, env=vllm_env(args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not reading and b"Reading batch from" in line:
                    reading.append(time.perf_counter())
                elif not writing and b"Writing outputs" in line:
                    writing.append(time.perf_counter())
                log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code = proc.wait()
        ended = time.perf_counter()
        reader.join(timeout=10)
    if code != 0 or not output.exists():
        raise RuntimeError(f"run_batch failed ({code}); see {log_path}:\n"
                           + log_path.read_text(errors="replace")[-3000:])
    usage = {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "requests": 0, "errors": 0}
    with open(output, encoding="utf-8") as fh:
        for raw in fh:
            line = json.loads(raw)
            usage["requests"] += 1
            body = (line.get("response") or {}).get("body") or {}
            if line.get("error") or not body.get("usage"):
                usage["errors"] += 1
                continue
            u = body["usage"]
            usage["input_tokens"] += u.get("prompt_tokens") or 0
            usage["output_tokens"] += u.get("completion_tokens") or 0
            usage["cached_tokens"] += (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    start = (reading[0] - began) if reading else None
    # Wall: from the first line read to the results being complete (the file write and the engine shutdown
    # after it are left out, in run_batch's favour).
    done = writing[0] if writing else ended
    return {"wall_s": done - (reading[0] if reading else began), "total_wall_s": ended - began,
            "engine_start_s": start, **usage}


class OurServer:
    """Our server with the vLLM engine, kept warm across workloads (one model load per model)."""

    def __init__(self, args: argparse.Namespace, scratch: Path, name: str = "server",
                 extra_args: tuple[str, ...] = ()) -> None:
        kw = engine_kwargs(args)
        extra = ["--dtype", kw["dtype"], "--max-num-seqs", str(kw["max_num_seqs"]),
                 "--engine-arg", f"max_num_batched_tokens={kw['max_num_batched_tokens']}",
                 "--engine-arg", f"enforce_eager={'true' if kw['enforce_eager'] else 'false'}",
                 "--no-prefix-caching" if "enable_prefix_caching" in kw else "--prefix-caching",
                 "--max-batch-lines", "1000000", *extra_args]
        self.scratch = scratch
        self.server = Server(scratch / f"{name}-data", engine="vllm", models=[args.model, args.embed_model],
                             extra_args=extra, env=vllm_env(args))
        self.api: BatchAPI | None = None
        self.warm: set[str] = set()

    def __enter__(self) -> OurServer:
        say("(c) starting our server (vLLM engine)")
        self.server.start(timeout=300)
        self.api = BatchAPI(self.server.base_url, timeout=3600)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.api is not None:
            self.api.close()
        self.server.stop()

    def run(self, workload: Workload, source: Path) -> dict[str, Any]:
        assert self.api is not None
        if workload.model not in self.warm:
            say(f"(c) loading {workload.model} with a one-line batch")
            first = Workload(f"warm-{workload.name}", workload.endpoint, workload.model,
                             [warmup_body(workload.bodies[0])])
            round_trip(self.api, first.write(self.scratch / f"warm-{workload.name}.jsonl"), workload.endpoint,
                       self.scratch / "warm.out.jsonl", poll=0.2)
            self.warm.add(workload.model)
        say(f"(c) our server: {workload.name}")
        # Polled every 0.25 s: a status call costs the server ~1 ms of CPU, which on 2 cores is taken from the
        # engine (polling every 50 ms cost 2% of a run's CPU); the poll adds at most 0.25 s to the wall time.
        trip = round_trip(self.api, source, workload.endpoint, self.scratch / f"server-{workload.name}.out.jsonl",
                          poll=0.25)
        usage, counts = trip.batch["usage"], trip.batch["request_counts"]
        return {"wall_s": trip.wall_s, "upload_s": trip.upload_s, "run_s": trip.run_s,
                "download_s": trip.download_s, "requests": counts["completed"], "errors": counts["failed"],
                "input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                "cached_tokens": usage["input_tokens_details"]["cached_tokens"]}


# ---- driver ------------------------------------------------------------------------------------------------


def rates(result: dict[str, Any]) -> dict[str, Any]:
    """Rates of one measurement, with the machine's 1-minute load average just after it (this machine is
    shared: a load well above the core count means the numbers were taken under contention)."""
    wall = result["wall_s"]
    return {"rps": result["requests"] / wall, "out_tok_s": result["output_tokens"] / wall,
            "in_tok_s": result["input_tokens"] / wall, "load_1m_after": os.getloadavg()[0], **result}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common_args(argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="generation model (name, folder or id)")
    parser.add_argument("--embed-model", default="all-minilm-l6-v2", help="embedding model")
    parser.add_argument("--workloads", default="short,prefix,mixed,embed,grouping",
                        help="comma-separated: short, prefix, mixed, embed, grouping")
    parser.add_argument("--systems", default="offline,run-batch,server", help="comma-separated subset")
    parser.add_argument("--requests", type=int, default=128, help="requests per generation workload")
    parser.add_argument("--embed-requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=48, help="output tokens of the short chats")
    parser.add_argument("--prefix-words", type=int, default=500, help="words in a long system prompt or document")
    parser.add_argument("--documents", type=int, default=128,
                        help="documents in the grouping experiment (enough to outgrow the KV cache)")
    parser.add_argument("--questions", type=int, default=2, help="questions per document there")
    parser.add_argument("--natural", action="store_true", help="let generations stop at EOS (no ignore_eos)")
    parser.add_argument("--seed", type=int, default=0)
    engine = parser.add_argument_group("engine settings, the same for all three systems")
    engine.add_argument("--dtype", default="float32", help="float32 on CPU (bf16 is slow there); auto on GPU")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's offline default on CPU")
    engine.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM's offline default on CPU")
    engine.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (CPU only)")
    args = parser.parse_args(argv)

    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    all_workloads = build_workloads(args)
    generation = [w for w in ("short", "prefix", "mixed") if w in chosen]
    embedding = ["embed"] if "embed" in chosen else []
    grouping = "grouping" in chosen
    results: dict[str, dict[str, dict[str, Any]]] = {}

    with workdir(args.keep) as scratch:
        files = {name: w.write(scratch / f"{name}.jsonl") for name, w in all_workloads.items()}
        for name in generation + embedding:
            results[name] = {}
        def save() -> None:  # after every measurement: a long run interrupted keeps what it measured
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            (RESULTS_DIR / "throughput-partial.json").write_text(json.dumps(results, indent=2))

        if "offline" in systems:
            for kind, names, model in (("generate", generation, args.model), ("embed", embedding, args.embed_model)):
                if names:
                    for name, result in run_offline(args, scratch, kind, model,
                                                    {n: files[n] for n in names}).items():
                        results[name]["offline"] = rates(result)
                    save()
        if "run-batch" in systems:
            for name in generation + embedding:
                results[name]["run-batch"] = rates(run_batch_cli(args, scratch, name, all_workloads[name].model,
                                                                 files[name]))
                save()
        if "server" in systems:
            with OurServer(args, scratch) as server:
                for name in generation + embedding:
                    results[name]["server"] = rates(server.run(all_workloads[name], files[name]))
                    save()
        if grouping:  # each order on a fresh server, so neither finds the other's documents cached
            for name, lookahead in (("documents-file-order", "0"), ("documents-grouped", "1024")):
                with OurServer(args, scratch, name, ("--prefix-lookahead", lookahead)) as server:
                    results[name] = {"server": rates(server.run(all_workloads[name], files[name]))}
                    save()

    rows = []
    ratios: dict[str, dict[str, float]] = {}
    for name, by_system in results.items():
        ours = by_system.get("server")
        for system in ("offline", "run-batch", "server"):
            r = by_system.get(system)
            if r is None:
                continue
            label = {"offline": "(a) vLLM LLM offline", "run-batch": "(b) vLLM run_batch",
                     "server": "(c) our server"}[system]
            cached = r.get("cached_tokens", 0) / r["input_tokens"] if r.get("input_tokens") else None
            ratio = None
            if ours is not None and system != "server":
                key = "out_tok_s" if all_workloads[name].endpoint == CHAT else "rps"
                ratio = ours[key] / r[key] if r[key] else None
                ratios.setdefault(name, {})["c/a" if system == "offline" else "c/b"] = ratio or 0.0
            rows.append([name, label, r["wall_s"], r.get("total_wall_s"), r["requests"], r["rps"], r["out_tok_s"],
                         r["in_tok_s"], cached, r.get("load_1m_after"), ratio])
    print_table(f"Throughput: {args.model} / {args.embed_model}, dtype {args.dtype}, max_num_seqs "
                f"{args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, prefix caching "
                f"{'on' if args.prefix_caching else 'off'}",
                ["workload", "system", "wall s", "incl. start s", "requests", "req/s", "out tok/s", "in tok/s",
                 "cached", "load", "c / this"], rows)
    print("\nwall s excludes engine start-up for every system; 'incl. start s' is run_batch's whole run. "
          "c / this = our server's output tok/s (req/s for embeddings) over that system's; load = the machine's "
          "1-minute load average after the run (2 cores: above 2 means other work competed).")
    grouping_gain = None
    if "documents-file-order" in results and "documents-grouped" in results:
        a, b = results["documents-file-order"]["server"], results["documents-grouped"]["server"]
        grouping_gain = b["out_tok_s"] / a["out_tok_s"] - 1
        print(f"prefix grouping on our server: {grouping_gain * 100:+.1f}% output tok/s, wall {a['wall_s']:.0f} s "
              f"→ {b['wall_s']:.0f} s (cached prompt tokens {a['cached_tokens'] / max(1, a['input_tokens']):.0%} "
              f"in file order → {b['cached_tokens'] / max(1, b['input_tokens']):.0%} grouped)")
    met = {name: {"c/a": r.get("c/a", 0) >= TARGET_VS_OFFLINE, "c/b": r.get("c/b", 0) >= TARGET_VS_RUN_BATCH}
           for name, r in ratios.items()}
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("keep", "no_json")},
               "workloads": {name: w.note for name, w in all_workloads.items()}, "results": results,
               "ratios": ratios, "prefix_grouping_gain": grouping_gain,
               "targets": {"c/a": TARGET_VS_OFFLINE, "c/b": TARGET_VS_RUN_BATCH, "met": met}}
    if not args.no_json:
        say(f"wrote {write_results('throughput', payload)}")
    return payload


if __name__ == "__main__":
    main()
