"""Baseline (a): vLLM's offline `LLM` over a whole list, the raw engine with no server around it.

Run as its own process by `benchmarks.throughput` (vLLM spawns its engine core, which needs a main guard):

    python -m benchmarks._offline --model FOLDER --kind generate --out RESULT.json IN.jsonl [IN.jsonl ...]

Each input is an OpenAI batch file; the request bodies become `LLM.chat` conversations with the same sampling
parameters (or `LLM.embed` inputs). The engine is built once; every input is timed on its own, after a small
warm-up, so engine start-up is excluded as it is for the warm server.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def read_bodies(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["body"] for line in fh if line.strip()]


def sampling(body: dict[str, Any]) -> Any:
    from vllm_batch_server.engines.vllm_compat import load

    return load("SamplingParams")(
        max_tokens=body.get("max_completion_tokens", body.get("max_tokens")),
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        seed=body.get("seed"),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def run_generate(llm: Any, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    conversations = [body["messages"] for body in bodies]
    params = [sampling(body) for body in bodies]
    began = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    wall = time.perf_counter() - began
    return {
        "wall_s": wall,
        "requests": len(outputs),
        "input_tokens": sum(len(o.prompt_token_ids or []) for o in outputs),
        "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
        "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
    }


def run_embed(llm: Any, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    texts: list[str] = []
    for body in bodies:
        raw = body["input"]
        texts.extend([raw] if isinstance(raw, str) else raw)
    began = time.perf_counter()
    outputs = llm.embed(texts, use_tqdm=False)
    wall = time.perf_counter() - began
    return {"wall_s": wall, "requests": len(bodies), "inputs": len(outputs),
            "input_tokens": sum(len(o.prompt_token_ids or []) for o in outputs), "output_tokens": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="model folder or id")
    parser.add_argument("--kind", choices=["generate", "embed"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine-json", default="{}", help="LLM(...) keyword arguments, as JSON")
    parser.add_argument("inputs", type=Path, nargs="+")
    args = parser.parse_args()

    from vllm_batch_server.engines.vllm_compat import load

    kwargs = json.loads(args.engine_json)
    began = time.perf_counter()
    llm = load("LLM")(model=args.model, runner="pooling" if args.kind == "embed" else "generate", **kwargs)
    start_s = time.perf_counter() - began
    config = llm.llm_engine.vllm_config
    run = run_embed if args.kind == "embed" else run_generate
    # Warm-up, as the server is warm: a few requests like the first input's, sharing no prompt prefix with it.
    warm = read_bodies(args.inputs[0])[:4]
    for body in warm:
        if "messages" in body:
            body["messages"][0]["content"] = "Warm-up request, ignore. " + body["messages"][0]["content"]
        else:
            body["input"] = "Warm-up request, ignore."
    run(llm, warm)
    results = {}
    for path in args.inputs:
        results[str(path)] = {**run(llm, read_bodies(path)), "load_1m_after": os.getloadavg()[0]}
    args.out.write_text(json.dumps({
        "engine_start_s": start_s,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_model_len": config.model_config.max_model_len,
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
