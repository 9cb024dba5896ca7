"""Where the frontend's CPU goes: py-spy on our server's process and on vLLM's run_batch, the same workloads.

The frontend is everything in the process that is not vLLM's engine core (which runs in processes of its
own): for run_batch, reading the file, vLLM's serving layer and its output handler; for our server, the same
serving layer and output handler plus what a durable server adds (the HTTP API, validation, the runner's
window, result lines, checkpoints, SQLite, the scheduler's and observers' loops). On a 2-core machine the
frontend shares the cores with the engine, so what it spends can be the engine's loss.

For each workload of `benchmarks.throughput` asked for (`--workloads`, the plain ones: short, prefix, mixed,
embed), each system runs it once while py-spy samples the frontend process (`--gil`: only a thread holding
the GIL, so a thread waiting in epoll or on a lock is not counted): run_batch between its "Reading batch" and
"Writing outputs" log lines, our server (warm: the model loaded before) from the upload to the download. Each
sample goes to the first component, from the innermost frame out, whose code it is in (COMPONENTS). The table
gives each component's share of the samples and that share of the process's CPU seconds as the kernel
counted them (psutil), with the CPU per request.

py-spy is not a dependency of this project: install it into a venv of its own and point `--py-spy` at it.

    python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy
    python -m benchmarks.frontend_profile --py-spy /tmp/pyspy/bin/py-spy --workloads short,mixed,embed
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import _workloads, throughput
from benchmarks._harness import print_table, say, workdir, write_results
from benchmarks._systems import OurServer, run_batch_cli
from benchmarks._workloads import PLAIN

# (component, a pattern of the files that are its code). A sample belongs to the first component matched from its
# innermost frame outwards, so vLLM's tokenizer called by our engine adapter counts as tokenizing, and library
# code (pydantic, json, starlette, prometheus_client) counts for whoever called it. py-spy names files from the
# package down (`vllm/entrypoints/...`, `vllm_batch_server/api/...`).
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("vLLM: tokenize", r"transformers/|/tokenizers/|_tokenize_prompt|TokenizerPool"),
    ("vLLM: output handler (detokenize, stats)", r"output_processor\.py|detokenizer\.py|_run_output_handler|"
                                                 r"vllm/v1/metrics/"),
    ("vLLM: requests into the engine (zmq)", r"async_llm\.py|core_client\.py|input_processor\.py|zmq/"),
    ("run_batch: reading the file, result lines", r"launchers/run_batch\.py"),
    ("vLLM: serving layer (request models, templates, responses)", r"vllm/entrypoints/|vllm/renderers/|"
                                                                   r"vllm/sampling_params"),
    ("ours: engine adapter (validation, result body)", r"vllm_batch_server/engines/"),
    ("ours: result lines, checkpoints", r"vllm_batch_server/queue/checkpoint\.py|vllm_batch_server/store/blobs"),
    ("ours: reading the input, grouping", r"vllm_batch_server/store/jsonl\.py|vllm_batch_server/queue/grouping\.py|"
                                          r"vllm_batch_server/queue/validate\.py"),
    ("ours: runner (window of requests)", r"vllm_batch_server/queue/runner\.py|vllm_batch_server/queue/online\.py"),
    ("ours: HTTP API (status calls, upload, download)", r"vllm_batch_server/api/|uvicorn/"),
    ("ours: SQLite", r"aiosqlite/|vllm_batch_server/store/"),
    ("ours: scheduler, observers", r"vllm_batch_server/"),
    ("logging", r"logging/__init__"),
)
OTHER = "event loop, threads, other"
_COMPILED = [(name, re.compile(pattern)) for name, pattern in COMPONENTS]


def component_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, pattern in _COMPILED:
            if pattern.search(frame):
                return name
    return OTHER


def read_raw(lines: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: `frame;frame;... count` per line, outermost frame first."""
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def shares(path: Path) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for stack, count in read_raw(fh):
                counts[component_of(stack)] += count
    return dict(counts)


class Spy:
    """py-spy recording one process until stopped (SIGINT makes it write its file)."""

    def __init__(self, py_spy: str, rate: int, out: Path) -> None:
        self.py_spy, self.rate, self.out = py_spy, rate, out
        self.proc: subprocess.Popen[bytes] | None = None

    def attach(self, pid: int) -> None:
        self.proc = subprocess.Popen([self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate),
                                      "--format", "raw", "--output", str(self.out), "--gil", "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def watch(self, pid: int, started: bool) -> None:
        if started:
            self.attach(pid)
        else:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def measure(args: argparse.Namespace, scratch: Path, names: list[str], systems: list[str]
            ) -> dict[str, dict[str, dict[str, Any]]]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    server = OurServer(args, scratch) if "server" in systems else None
    try:
        if server is not None:
            server.__enter__()
        for name in names:
            for system in systems:
                workload = _workloads.workload(args, name, f"profile-{name}-{system}")
                source = workload.write(scratch / f"{name}-{system}.jsonl")
                spy = Spy(args.py_spy, args.rate, scratch / f"{name}-{system}.spy.txt")
                if system == "run-batch":
                    result = run_batch_cli(args, scratch, name, workload.model, source, watch=spy.watch)
                else:
                    assert server is not None
                    server.warm(workload)
                    spy.attach(server.server.pid)  # sampling starts within milliseconds
                    try:
                        result = server.run(workload, source)
                    finally:
                        spy.stop()
                samples = shares(spy.out)
                results.setdefault(name, {})[system] = {
                    "wall_s": result["wall_s"], "requests": result["requests"],
                    "frontend_cpu_s": result.get("frontend_cpu_s"), "engine_cpu_s": result.get("engine_cpu_s"),
                    "samples": samples}
                say(f"{system}, {name}: {result['wall_s']:.1f} s, frontend CPU {result.get('frontend_cpu_s')} s, "
                    f"{sum(samples.values())} samples")
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return results


def report(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    for name, by_system in results.items():
        systems = list(by_system)
        components = sorted({c for r in by_system.values() for c in r["samples"]},
                            key=lambda c: -max(r["samples"].get(c, 0) / max(1, sum(r["samples"].values()))
                                               for r in by_system.values()))
        rows = []
        for component in components:
            row: list[Any] = [component]
            for system in systems:
                r = by_system[system]
                total = sum(r["samples"].values())
                share = r["samples"].get(component, 0) / total if total else 0.0
                row += [f"{share:.1%}", share * (r["frontend_cpu_s"] or 0)]
            rows.append(row)
        totals: list[Any] = ["all (CPU s; ms per request)"]
        for system in systems:
            r = by_system[system]
            cpu = r["frontend_cpu_s"] or 0.0
            totals += [f"{sum(r['samples'].values())} samples", f"{cpu:.2f} s; {cpu / r['requests'] * 1000:.2f} ms"]
        rows.append(totals)
        print_table(f"{name}: the frontend process's CPU by component (share of py-spy's samples holding the GIL; "
                    "that share of the CPU seconds); wall " + ", ".join(
                        f"{s} {by_system[s]['wall_s']:.1f} s" for s in systems),
                    ["component", *[f"{s} {k}" for s in systems for k in ("share", "CPU s")]], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = throughput.build_parser("python -m benchmarks.frontend_profile", __doc__)
    parser.set_defaults(workloads="short,mixed,embed", systems="run-batch,server")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", metavar="PATH",
                        help="the py-spy executable (install it into a venv of its own)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    args = parser.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := [n for n in names if n not in PLAIN]:
        parser.error(f"unknown workload(s) {', '.join(unknown)}: choose from {', '.join(PLAIN)}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := [s for s in systems if s not in ("run-batch", "server")]:
        parser.error(f"unknown system(s) {', '.join(unknown)}: choose from run-batch, server")
    if shutil.which(args.py_spy) is None:
        parser.error(f"py-spy not found at {args.py_spy!r}; install it: python3 -m venv /tmp/pyspy && "
                     "/tmp/pyspy/bin/pip install py-spy, then --py-spy /tmp/pyspy/bin/py-spy")
    with workdir(args.keep) as scratch:
        results = measure(args, scratch, names, systems)
    report(results)
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("keep", "no_json", "report")},
               "results": results}
    if not args.no_json:
        say(f"wrote {write_results('frontend_profile', payload)}")
    return payload


if __name__ == "__main__":
    main()
