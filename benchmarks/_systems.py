"""The three systems `benchmarks.throughput` compares, each given the same weights, engine settings and file:

  (a) offline   vLLM's `LLM.chat` / `LLM.embed` over the whole list (in its own process: `benchmarks._offline`);
  (b) run-batch `python -m vllm.entrypoints.openai.run_batch -i IN -o OUT`, vLLM's own batch runner;
  (c) server    our server, from the upload to the downloaded output, over loopback HTTP as a user's client.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._harness import REPO, BatchAPI, Server, cpu_seconds, round_trip, say
from benchmarks._workloads import EMBEDDINGS, Workload, warmup_body


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
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.settings import default_cache_dir

    return model_files.resolve(name, Path(os.environ.get("BATCH_SERVER_MODEL_CACHE_DIR") or default_cache_dir())).path


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


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds so far of the frontend process `pid` (HTTP, tokenizing, detokenizing, our queue) and of vLLM's
    engine processes under it. Both systems' frontends share the machine's cores with the engine: on 2 cores,
    a frontend's CPU can be the engine's loss."""
    return cpu_seconds(pid), cpu_seconds(pid, descendants=True)


def cpu_used(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    return {"frontend_cpu_s": round(after[0] - before[0], 2), "engine_cpu_s": round(after[1] - before[1], 2)}


def run_batch_cli(args: argparse.Namespace, scratch: Path, name: str, model: str, source: Path,
                  watch: Callable[[int, bool], None] | None = None) -> dict[str, Any]:
    """vLLM's run_batch as a user runs it; timed from its 'Reading batch' log line to its exit. `watch(pid,
    started)` is told the process at the two lines that bound the measurement (a profiler attaches there)."""
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
    if source.read_text().count(EMBEDDINGS) and "--runner" not in command:  # an embeddings file
        command += ["--runner", "pooling"]
    log_path = scratch / f"run-batch-{name}.log"
    began = time.perf_counter()
    reading: list[float] = []
    writing: list[float] = []  # all results are in: what is left is writing the file and shutting down
    cpu: list[tuple[float, float]] = []  # at those two lines
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=scratch, env=vllm_env(args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not reading and b"Reading batch from" in line:
                    reading.append(time.perf_counter())
                    cpu.append(cpu_split(proc.pid))
                    if watch is not None:
                        watch(proc.pid, True)
                elif not writing and b"Writing outputs" in line:
                    writing.append(time.perf_counter())
                    cpu.append(cpu_split(proc.pid))
                    if watch is not None:
                        watch(proc.pid, False)
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
            "engine_start_s": start, **(cpu_used(*cpu) if len(cpu) == 2 else {}), **usage}


def server_args(args: argparse.Namespace) -> list[str]:
    """Our server's flags for the same engine settings as (a) and (b)."""
    kw = engine_kwargs(args)
    return ["--dtype", kw["dtype"], "--max-num-seqs", str(kw["max_num_seqs"]),
            "--engine-arg", f"max_num_batched_tokens={kw['max_num_batched_tokens']}",
            "--engine-arg", f"enforce_eager={'true' if kw['enforce_eager'] else 'false'}",
            "--no-prefix-caching" if "enable_prefix_caching" in kw else "--prefix-caching",
            "--max-batch-lines", "1000000", *shlex.split(getattr(args, "server_flags", "") or "")]


def new_server(args: argparse.Namespace, scratch: Path, name: str, extra_args: tuple[str, ...] = ()) -> Server:
    return Server(scratch / f"{name}-data", engine="vllm", models=[args.model, args.embed_model],
                  extra_args=[*server_args(args), *extra_args], env=vllm_env(args))


class OurServer:
    """Our server with the vLLM engine, kept warm across measurements: before a workload of another model than
    the loaded one, a one-line batch loads it, so no measurement includes a model load."""

    def __init__(self, args: argparse.Namespace, scratch: Path, name: str = "server",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.scratch = scratch
        self.server = new_server(args, scratch, name, extra_args)
        self.poll = float(getattr(args, "poll", 0.0) or 0.0)  # 0: follow the event stream
        self.api: BatchAPI | None = None
        self.loaded: str | None = None

    def __enter__(self) -> OurServer:
        say("(c) starting our server (vLLM engine)")
        self.server.start(timeout=300)
        self.api = BatchAPI(self.server.base_url, timeout=3600)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.api is not None:
            self.api.close()
        self.server.stop()

    def warm(self, workload: Workload) -> None:
        """Load `workload`'s model, if it is not the one loaded, with a one-line batch."""
        assert self.api is not None
        if workload.model != self.loaded:
            say(f"(c) loading {workload.model} with a one-line batch")
            first = Workload(f"warm-{workload.name}", workload.endpoint, workload.model,
                             [warmup_body(workload.bodies[0])])
            round_trip(self.api, first.write(self.scratch / f"warm-{workload.name}.jsonl"), workload.endpoint,
                       self.scratch / "warm.out.jsonl", poll=0.2)
            self.loaded = workload.model

    def run(self, workload: Workload, source: Path) -> dict[str, Any]:
        assert self.api is not None
        self.warm(workload)
        say(f"(c) our server: {workload.name}")
        # The end is learned from the server's event stream, as (b)'s is from its log line: polling the status
        # instead was late by up to its interval (0.25 s), and its status calls (1-2 ms of server CPU each,
        # taken from the engine on 2 cores) were half of the server's own CPU in a chat batch (py-spy,
        # benchmarks.frontend_profile). --poll measures a polling client.
        before = cpu_split(self.server.pid)
        trip = round_trip(self.api, source, workload.endpoint, self.scratch / f"server-{workload.name}.out.jsonl",
                          poll=self.poll, events=not self.poll)
        return {"wall_s": trip.wall_s, "upload_s": trip.upload_s, "run_s": trip.run_s,
                "download_s": trip.download_s, **cpu_used(before, cpu_split(self.server.pid)),
                **batch_usage(trip.batch)}


def batch_usage(batch: dict[str, Any]) -> dict[str, Any]:
    usage, counts = batch["usage"], batch["request_counts"]
    return {"requests": counts["completed"], "errors": counts["failed"], "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "cached_tokens": (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0}


# ---- a queue of files ---------------------------------------------------------------------------------------


def run_batch_queue(args: argparse.Namespace, scratch: Path, files: list[tuple[Workload, Path]]) -> dict[str, Any]:
    """(b) as a user runs a queue with it: one run_batch process per file, one after another, each paying its
    own start-up; timed from the first launch to the last exit."""
    began = time.perf_counter()
    per_file = [run_batch_cli(args, scratch, w.name, w.model, path) for w, path in files]
    wall = time.perf_counter() - began
    return {"wall_s": wall, "engine_starts": len(files),
            "engine_start_s": sum(f["engine_start_s"] or 0 for f in per_file),
            "files": [{"name": w.name, "total_wall_s": f["total_wall_s"], "engine_start_s": f["engine_start_s"],
                       "work_s": f["wall_s"]} for (w, _), f in zip(files, per_file, strict=True)],
            **{key: sum(f[key] for f in per_file) for key in ("requests", "errors", "input_tokens", "output_tokens",
                                                              "cached_tokens")}}


_LOADED = re.compile(r"vLLM loaded (\S+) in ([0-9.]+) s")


def server_queue(args: argparse.Namespace, scratch: Path, name: str,
                 files: list[tuple[Workload, Path]]) -> dict[str, Any]:
    """(c) as a user runs the same queue: a server that is up (started, no model loaded yet) gets all the files
    at once; timed from the first upload to the last download. The server's own start (to /health) is
    reported apart: a user starts it once, not per queue."""
    resident = getattr(args, "queue_max_loaded_models", 1)
    env = vllm_env(args)
    if resident > 1 and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # The KV cache space is split between the resident models; the embedding model (encoder-only) uses
        # none of its part, so this gives the chat model's engine the space (b) gets, and takes no more memory.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib * resident)
    server = new_server(args, scratch, name, ("--max-loaded-models", str(resident)))
    server.env = env
    say(f"(c) our server, a queue of {len(files)} files submitted at once ({name}, up to {resident} models "
        "loaded)")
    try:
        launched = server.launch()
        healthy_s = launched.wait_healthy(300)
        api = BatchAPI(server.base_url, timeout=3600)
        try:
            began = time.perf_counter()
            batch_ids = [api.create_batch(api.upload(path), w.endpoint)["id"] for w, path in files]
            # Each file's end as it happens (the files are watched together, not waited for in order: a file
            # done early would otherwise be timed when the ones before it are), downloaded at once, as a user
            # would take each output.
            ended: dict[str, tuple[dict[str, Any], float]] = {}
            while len(ended) < len(batch_ids):
                for (w, _), batch_id in zip(files, batch_ids, strict=True):
                    if batch_id in ended:
                        continue
                    batch = api.batch(batch_id)
                    if batch["status"] in ("failed", "expired", "cancelled"):
                        raise RuntimeError(f"queue batch {w.name} ended {batch['status']}: {batch.get('errors')}")
                    if batch["status"] == "completed":
                        api.download(batch["output_file_id"], scratch / f"{name}-{w.name}.out.jsonl")
                        ended[batch_id] = (batch, time.perf_counter() - began)
                time.sleep(0.25)
            wall = max(done for _, done in ended.values())
            batches = [ended[batch_id][0] for batch_id in batch_ids]
            done_at = [ended[batch_id][1] for batch_id in batch_ids]
        finally:
            api.close()
    finally:
        server.stop()
    loads = [(model, float(seconds)) for model, seconds in _LOADED.findall(server.log_tail(10_000_000))]
    totals = [batch_usage(b) for b in batches]
    return {"wall_s": wall, "server_start_s": healthy_s, "engine_starts": len(loads),
            "engine_start_s": sum(seconds for _, seconds in loads), "model_loads": loads,
            "files": [{"name": w.name, "done_after_s": t} for (w, _), t in zip(files, done_at, strict=True)],
            **{key: sum(t[key] for t in totals) for key in totals[0]}}
