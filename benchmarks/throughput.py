"""End-to-end throughput, side by side in one run, on the same files, weights and engine settings:

  (a) offline   vLLM's `LLM.chat` / `LLM.embed` over the whole list: the raw engine, no server, no files;
  (b) run-batch `python -m vllm.entrypoints.openai.run_batch -i IN -o OUT` (vLLM's own batch runner);
  (c) server    our server from upload to downloaded output (queueing, validation, checkpoints, files).

Three parts (`--workloads` picks; all by default):

- where the design should win: **documents** — many long documents, each asked a few questions, the file
  written question by question so that the documents outgrow the KV cache before their next question;
  **documents-system** — the same behind one long system prompt. (a) and (b) run the file in its order; our
  server groups requests by their longest shared prefix. Start-up excluded everywhere.
- **queue** — three files over two models (chats, more chats, embeddings), as a user leaves them for the
  night: (b) run_batch once per file, start-up included as a user pays it, against (c) a running server
  (no model loaded yet) given all three at once; and the same server with the files in an order that
  alternates models (chats, embeddings, chats). Our server keeps both models loaded (`--queue-max-loaded-models
  2`, the default here): the second model loads while the first model's batches run, and alternating costs
  no switch (with 1, the queue runs in creation order and alternating costs one more model load).
- the plain workloads: **short** chats, a long shared system prompt (**prefix**), **mixed** lengths,
  **embed**dings; each system measured `--repeats` times, the systems interleaved round by round (their
  order rotated), medians and spread reported. Engine start-up excluded: (a) times only `LLM.chat` after a
  warm-up, (c) runs warm (a one-line batch loads a model before it is measured), (b) is timed from its
  "Reading batch" log line to its "Writing outputs" line (its total, start-up included, is reported too).

Every measurement gets prompts of its own (see `_workloads`), so no system finds another run's prompts in
its prefix cache. Requests are greedy with `ignore_eos`, so every system generates the same tokens' worth of
work (`--natural` lets them stop at EOS).

    python -m benchmarks.throughput [--workloads documents,queue] [--repeats 3] [--model NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import _workloads
from benchmarks._harness import RESULTS_DIR, common_args, print_table, say, workdir, write_results
from benchmarks._systems import OurServer, run_batch_cli, run_batch_queue, run_offline, server_queue
from benchmarks._workloads import CHAT, DOCUMENTS, EMBEDDINGS, PLAIN

# What each workload must reach: our server's throughput over the other system's (c/a, c/b; medians), and for
# the queue, run_batch's wall time over ours.
GOALS: dict[str, dict[str, float]] = {
    "documents": {"c/a": 1.5, "c/b": 1.5},
    "documents-system": {"c/a": 1.5, "c/b": 1.5},
    "queue": {"c/b": 1.6, "c/b alternating": 1.5},
    **{name: {"c/a": 0.97, "c/b": 1.0} for name in PLAIN},
}
LABELS = {"offline": "(a) vLLM LLM offline", "run-batch": "(b) vLLM run_batch", "server": "(c) our server",
          "server-file-order": "(c0) our server, --prefix-lookahead 0",
          "server-alternating": "(c) our server, models alternating"}

Results = dict[str, dict[str, list[dict[str, Any]]]]  # workload -> system -> one entry per measurement


def rates(result: dict[str, Any]) -> dict[str, Any]:
    """Rates of one measurement, with the machine's 1-minute load average just after it (a load well above
    the core count means the numbers were taken under contention)."""
    wall = result["wall_s"]
    return {"rps": result["requests"] / wall, "out_tok_s": result["output_tokens"] / wall,
            "in_tok_s": result["input_tokens"] / wall, "load_1m_after": os.getloadavg()[0], **result}


def rotated(items: list[str], by: int) -> list[str]:
    """Round r starts with the r-th system, so that no system always runs first (or last) in a round."""
    by %= max(1, len(items))
    return items[by:] + items[:by]


class Recorder:
    """Collects measurements; writes them after each one, so an interrupted long run keeps what it measured."""

    def __init__(self) -> None:
        self.results: Results = {}
        self.failed: list[str] = []

    @contextlib.contextmanager
    def attempt(self, what: str) -> Iterator[None]:
        """A measurement that fails is reported and skipped: a long run keeps going with the others."""
        try:
            yield
        except Exception:
            traceback.print_exc()
            say(f"FAILED: {what}; going on with the rest")
            self.failed.append(what)

    def add(self, workload: str, system: str, result: dict[str, Any], round_no: int) -> None:
        entry = {**rates(result), "round": round_no}
        self.results.setdefault(workload, {}).setdefault(system, []).append(entry)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "throughput-partial.json").write_text(json.dumps(self.results, indent=2, default=str))


def measure_round(args: argparse.Namespace, scratch: Path, names: list[str], systems: list[str], round_no: int,
                  server: OurServer | None, record: Recorder) -> None:
    """Each system runs each workload of `names` once, on files of this round's own prompts."""
    workloads = {name: _workloads.workload(args, name, f"{name}-{round_no}") for name in names}
    files = {name: w.write(scratch / f"{name}-{round_no}.jsonl") for name, w in workloads.items()}
    say(f"round {round_no + 1}: {', '.join(names)}; systems in the order {', '.join(rotated(systems, round_no))}")
    for system in rotated(systems, round_no):
        with record.attempt(f"{system}, {', '.join(names)}, round {round_no + 1}"):
            if system == "offline":
                for kind, endpoint, model in (("generate", CHAT, args.model), ("embed", EMBEDDINGS, args.embed_model)):
                    group = {name: files[name] for name in names if workloads[name].endpoint == endpoint}
                    if group:
                        for name, result in run_offline(args, scratch, kind, model, group).items():
                            record.add(name, system, result, round_no)
            elif system == "run-batch":
                for name in names:
                    record.add(name, system, run_batch_cli(args, scratch, name, workloads[name].model, files[name]),
                               round_no)
            elif system == "server" and server is not None:
                for name in names:
                    record.add(name, system, server.run(workloads[name], files[name]), round_no)
            elif system == "server-file-order":  # a fresh server each time: nothing cached from the grouped runs
                with OurServer(args, scratch, f"file-order-{round_no}", ("--prefix-lookahead", "0")) as plain:
                    for name in names:
                        record.add(name, system, plain.run(workloads[name], files[name]), round_no)
    for path in files.values():
        path.unlink()


def measure_queue(args: argparse.Namespace, scratch: Path, systems: list[str], round_no: int,
                  record: Recorder) -> None:
    queue = _workloads.queue(args, f"queue-{round_no}")
    files = [(w, w.write(scratch / f"{w.name}-{round_no}.jsonl")) for w in queue]
    alternating = [files[0], files[2], files[1]]  # chats, embeddings, chats: one more model switch
    for system in rotated(systems, round_no):
        with record.attempt(f"{system}, queue, round {round_no + 1}"):
            if system == "run-batch":
                record.add("queue", system, run_batch_queue(args, scratch, files), round_no)
            elif system == "server":
                record.add("queue", system, server_queue(args, scratch, f"queue-{round_no}", files), round_no)
            elif system == "server-alternating":
                record.add("queue", system, server_queue(args, scratch, f"queue-alt-{round_no}", alternating),
                           round_no)


# ---- summary -------------------------------------------------------------------------------------------------


def rate_key(name: str) -> str:
    return "rps" if name == "embed" else "out_tok_s"


def summarize(results: Results) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]],
                                         dict[str, dict[str, list[float]]]]:
    """Medians and spread per workload and system; ratios of medians; ratios round by round."""
    summary: dict[str, dict[str, Any]] = {}
    ratios: dict[str, dict[str, float]] = {}
    per_round: dict[str, dict[str, list[float]]] = {}
    for name, by_system in results.items():
        summary[name] = {}
        for system, runs in by_system.items():
            walls = [r["wall_s"] for r in runs]
            values = [r[rate_key(name)] for r in runs]
            cached = [r["cached_tokens"] / r["input_tokens"] for r in runs  # prefix caching: generation only
                      if name != "embed" and r.get("input_tokens") and r.get("cached_tokens") is not None]
            summary[name][system] = {
                "n": len(runs), "wall_s": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
                "rate": statistics.median(values),
                "spread": (max(values) - min(values)) / statistics.median(values) if any(values) else 0.0,
                "rps": statistics.median(r["rps"] for r in runs),
                "out_tok_s": statistics.median(r["out_tok_s"] for r in runs),
                "cached": statistics.median(cached) if cached else None,
                "load": statistics.median(r["load_1m_after"] for r in runs),
                "total_wall_s": _median_or_none([r.get("total_wall_s") for r in runs]),
                "engine_start_s": _median_or_none([r.get("engine_start_s") for r in runs]),
                "engine_starts": _median_or_none([r.get("engine_starts") for r in runs]),
                "frontend_cpu_s": _median_or_none([r.get("frontend_cpu_s") for r in runs]),
                "engine_cpu_s": _median_or_none([r.get("engine_cpu_s") for r in runs]),
                "last": runs[-1] if name == "queue" else None,
            }
        ours = summary[name].get("server")
        if ours is None:
            continue
        for system, key in (("offline", "c/a"), ("run-batch", "c/b")):
            other = summary[name].get(system)
            if other is None:
                continue
            if name == "queue":  # how much sooner the whole queue is done
                ratios.setdefault(name, {})[key] = other["wall_s"] / ours["wall_s"]
                continue
            ratios.setdefault(name, {})[key] = ours["rate"] / other["rate"] if other["rate"] else 0.0
            mine = {r["round"]: r[rate_key(name)] for r in results[name]["server"]}
            per_round.setdefault(name, {})[key] = [mine[r["round"]] / r[rate_key(name)]
                                                   for r in results[name][system] if r["round"] in mine]
        if name == "queue" and "server-alternating" in summary[name] and "run-batch" in summary[name]:
            ratios[name]["c/b alternating"] = (summary[name]["run-batch"]["wall_s"]
                                               / summary[name]["server-alternating"]["wall_s"])
        if "server-file-order" in summary[name]:
            file_order = summary[name]["server-file-order"]["rate"]
            ratios.setdefault(name, {})["grouped/file order"] = ours["rate"] / file_order
    return summary, ratios, per_round


def results_of_queue(summary: dict[str, dict[str, Any]]) -> dict[str, str]:
    """One line per system: where the queue's time went (its last round)."""
    lines = {}
    for system, s in summary.get("queue", {}).items():
        last = s.get("last") or {}
        if system == "run-batch":
            lines[system] = "; ".join(
                f"{f['name']} {f['total_wall_s']:.0f} s (start-up {f['engine_start_s'] or 0:.0f} s)"
                for f in last.get("files", []))
        else:
            loads = ", ".join(f"{model} {seconds:.0f} s" for model, seconds in last.get("model_loads", []))
            done = "; ".join(f"{f['name']} done after {f['done_after_s']:.0f} s" for f in last.get("files", []))
            lines[system] = f"{done}; model loads: {loads}; server up in {last.get('server_start_s', 0):.1f} s"
    return lines


def frontend_cpu(by_system: dict[str, Any]) -> str:
    """Where each system's CPU went (run_batch's and our server's; the offline run has no frontend process):
    on a 2-core machine the frontend shares the cores with the engine."""
    return "; ".join(f"{LABELS[system]} {s['frontend_cpu_s']:.0f} / {s['engine_cpu_s']:.0f}"
                     for system, s in by_system.items() if s.get("frontend_cpu_s") is not None)


def _median_or_none(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def print_tables(args: argparse.Namespace, summary: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float]],
                 per_round: dict[str, dict[str, list[float]]], met: dict[str, dict[str, bool]]) -> None:
    def verdict(name: str) -> str:
        checks = met.get(name, {})
        return "-" if not checks else ("yes" if all(checks.values()) else "NO")

    def goal(name: str) -> str:
        return ", ".join(f"{key} ≥ {value}" for key, value in GOALS.get(name, {}).items())

    headline = []
    for name in (*DOCUMENTS, "queue"):
        by = summary.get(name)
        if not by:
            continue
        cells = []
        for system in ("offline", "run-batch", "server"):
            s = by.get(system)
            if s is None:
                cells.append("-")
            elif name == "queue":
                cells.append(f"{s['wall_s']:.0f} s, {s['engine_starts']:.0f} engine starts")
            else:
                cells.append(f"{s['wall_s']:.0f} s, {percent(s['cached'])} cached")
        r = ratios.get(name, {})
        headline.append([name, *cells, r.get("c/a"), r.get("c/b"), goal(name), verdict(name)])
    if headline:
        print_table("Where the design is ahead (wall time, median; c/x = our throughput over x's, for the queue "
                    "x's wall time over ours)",
                    ["workload", "(a) LLM offline", "(b) run_batch", "(c) our server", "c/a", "c/b", "target", "met"],
                    headline)
        queue = summary.get("queue", {})
        if "server-alternating" in queue:
            alternating = ratios.get("queue", {}).get("c/b alternating")
            print(f"queue with models alternating (chats, embeddings, chats): our server "
                  f"{queue['server-alternating']['wall_s']:.0f} s, {queue['server-alternating']['engine_starts']:.0f} "
                  f"engine starts" + (f"; c/b {alternating:.2f}" if alternating else ""))
        for system, runs in results_of_queue(summary).items():
            print(f"queue, {LABELS[system]}: " + runs)
        for name in DOCUMENTS:
            if "grouped/file order" in ratios.get(name, {}):
                print(f"{name}: our server grouped vs in file order: {ratios[name]['grouped/file order']:.2f}×")
            if cpu := frontend_cpu(summary.get(name, {})):
                print(f"{name}, CPU seconds of the frontend process / of vLLM's engine processes: {cpu}")

    rows = []
    for name in PLAIN:
        for system in ("offline", "run-batch", "server"):
            s = summary.get(name, {}).get(system)
            if s is None:
                continue
            key = {"offline": "c/a", "run-batch": "c/b"}.get(system)
            each = per_round.get(name, {}).get(key or "", [])
            rows.append([name, LABELS[system], s["n"], s["wall_s"], f"{s['wall_min']:.1f}-{s['wall_max']:.1f}",
                         s["engine_start_s"], s["rps"], s["out_tok_s"] or None, f"±{s['spread'] / 2:.1%}",
                         percent(s["cached"]), s["load"], ratios.get(name, {}).get(key or ""),
                         f"{min(each):.2f}-{max(each):.2f}" if each else None])
    if rows:
        rounds = max(s["n"] for by in summary.values() for s in by.values())
        print_table(f"Plain workloads: medians of {rounds} interleaved rounds ({args.model} / {args.embed_model},"
                    f" {args.dtype}, max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
                    f"{args.max_num_batched_tokens})",
                    ["workload", "system", "runs", "wall s", "range s", "start-up s", "req/s", "out tok/s",
                     "spread", "cached", "load", "c / this", "per round"], rows)
        print("\nwall s excludes engine start-up for every system (start-up s: run_batch's, paid per file). "
              "c / this: our server's median output tok/s (req/s for embeddings) over that system's; per round: "
              "the same ratio in each round; spread: half the range of the rate over its median.")
        plain_goals = ", ".join(f"{name}: {verdict(name)}" for name in PLAIN if name in summary)
        print(f"targets c/a ≥ 0.97 and c/b ≥ 1.0 on medians — {plain_goals}")


def build_parser(prog: str = "python -m benchmarks.throughput", description: str | None = __doc__
                 ) -> argparse.ArgumentParser:
    """The workloads' and engine settings' flags (benchmarks.frontend_profile takes the same ones)."""
    parser = common_args(argparse.ArgumentParser(prog=prog, description=description,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="generation model (name, folder or id)")
    parser.add_argument("--embed-model", default="all-minilm-l6-v2", help="embedding model")
    parser.add_argument("--workloads", default=",".join((*DOCUMENTS, "queue", *PLAIN)),
                        help="comma-separated: " + ", ".join((*DOCUMENTS, "queue", *PLAIN)))
    parser.add_argument("--systems", default="offline,run-batch,server",
                        help="comma-separated subset; add server-file-order to run the documents on our server "
                             "in the file's order too (--prefix-lookahead 0)")
    parser.add_argument("--server-flags", default="", metavar="FLAGS",
                        help="more flags for our server, one string (to see what a setting costs: "
                             "--server-flags='--no-priority-scheduling')")
    parser.add_argument("--poll", type=float, default=0.0, metavar="SECONDS",
                        help="learn that our server's batch ended by asking for its status every SECONDS (what a "
                             "polling client costs the server) instead of from its event stream (default)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the plain workloads")
    parser.add_argument("--documents-repeats", type=int, default=1, help="rounds of the documents workloads")
    parser.add_argument("--queue-repeats", type=int, default=1, help="rounds of the queue")
    parser.add_argument("--queue-alternating", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the queue on our server with the models alternating")
    parser.add_argument("--queue-max-loaded-models", type=int, default=2,
                        help="our server's --max-loaded-models in the queue (2: both models resident; 1: one "
                             "at a time, each switch unloading one and loading the other)")
    parser.add_argument("--requests", type=int, default=128, help="requests per generation workload")
    parser.add_argument("--embed-requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=48, help="output tokens of the short chats")
    parser.add_argument("--prefix-words", type=int, default=500, help="words in a long system prompt or document")
    parser.add_argument("--documents", type=int, default=128,
                        help="documents in the documents workloads (enough to outgrow the KV cache)")
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
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="measure nothing: print the tables of earlier measurements (a throughput-*.json, or "
                             "throughput-partial.json from an interrupted run)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        return report(args, saved.get("results", saved) if "benchmark" in saved else saved)

    chosen = {w.strip() for w in args.workloads.split(",") if w.strip()}
    unknown = chosen - {*PLAIN, *DOCUMENTS, "queue"}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    record = Recorder()

    with workdir(args.keep) as scratch:
        parts: list[tuple[list[str], int, list[str]]] = [
            ([n for n in DOCUMENTS if n in chosen], args.documents_repeats, systems),
            ([n for n in PLAIN if n in chosen], args.repeats, [s for s in systems if s != "server-file-order"]),
        ]
        for names, repeats, part_systems in parts:
            if not names:
                continue
            # One warm server per part, up while (a) and (b) run (idle: its engine waits on a queue).
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(OurServer(args, scratch)) if "server" in part_systems else None
                for round_no in range(repeats):
                    measure_round(args, scratch, names, part_systems, round_no, server, record)
        if "queue" in chosen:
            queue_systems = [s for s in systems if s in ("run-batch", "server")]
            if "server" in queue_systems and args.queue_alternating:
                queue_systems.append("server-alternating")
            for round_no in range(args.queue_repeats):
                measure_queue(args, scratch, queue_systems, round_no, record)

    payload = report(args, record.results)
    payload["workloads"] = {name: _workloads.workload(args, name, "note").note
                            for name in (*DOCUMENTS, *PLAIN) if name in chosen}
    payload["failed"] = record.failed
    if not args.no_json:
        say(f"wrote {write_results('throughput', payload)}")
    if record.failed:
        raise RuntimeError(f"measurements failed (tables above show the others): {'; '.join(record.failed)}")
    return payload


def report(args: argparse.Namespace, results: Results) -> dict[str, Any]:
    summary, ratios, per_round = summarize(results)
    met = {name: {key: value >= GOALS[name][key] for key, value in r.items() if key in GOALS.get(name, {})}
           for name, r in ratios.items()}
    print_tables(args, summary, ratios, per_round, met)
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("keep", "no_json", "report")},
            "results": results, "summary": summary, "ratios": ratios, "ratios_per_round": per_round,
            "targets": {"goals": {name: GOALS[name] for name in ratios if name in GOALS}, "met": met}}


if __name__ == "__main__":
    main()
