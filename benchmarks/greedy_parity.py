"""Greedy parity: the server's answers equal vLLM's offline `LLM.chat` answers for the same requests.

    python -m benchmarks.greedy_parity [--requests 32] [--max-tokens 32] [--model smollm2-135m-instruct]

1. Starts `vllm-batch-server serve --engine vllm` with one model, runs a chat batch (temperature 0) through
   the Files/Batches API, downloads the output, and stops the server.
2. Builds vLLM's offline `LLM` on the same model folder with the same engine settings the server uses on this
   machine, and runs `LLM.chat` on the same conversations with the model's default sampling parameters plus
   the request's temperature and max_tokens (what the server's serving layer does).
3. Compares line by line: generated text, finish reason and token counts. Exits 1 on any difference.

Greedy decoding is deterministic for a given batch composition; on CPU in float32 we have seen no
difference at all, but a GPU's batch-dependent kernels may in rare cases flip a near-tie.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import BatchAPI, Server, print_table, round_trip, say, workdir, write_jsonl, write_results

TOPICS = ["the sea", "a mountain", "bread", "rain", "a library", "the moon", "tea", "a bicycle", "snow",
          "a garden", "music", "a river", "coffee", "a city at night", "a forest", "the desert"]


def conversations(n: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        style = ["one sentence", "two short sentences", "a short list", "a haiku"][i // len(TOPICS) % 4]
        out.append([{"role": "user", "content": f"Write {style} about {topic}."}])
    return out


def server_answers(model: str, convs: list[list[dict[str, str]]], max_tokens: int, root: Path,
                   max_model_len: int) -> tuple[dict[str, dict[str, Any]], float]:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": conv, "max_tokens": max_tokens, "temperature": 0}}
             for i, conv in enumerate(convs)]
    write_jsonl(root / "in.jsonl", lines)
    with Server(root / "data", engine="vllm", models=[model],
                extra_args=["--max-model-len", str(max_model_len)]) as server:
        server.start()
        api = BatchAPI(server.base_url)
        try:
            trip = round_trip(api, root / "in.jsonl", "/v1/chat/completions", root / "out.jsonl", poll=0.5)
        finally:
            api.close()
    out = {}
    for raw in (root / "out.jsonl").read_text().splitlines():
        line = json.loads(raw)
        out[line["custom_id"]] = line["response"]["body"]
    return out, trip.run_s


def offline_answers(model: str, convs: list[list[dict[str, str]]], max_tokens: int,
                    max_model_len: int) -> list[Any]:
    from vllm_batch_server.engines.model_files import resolve
    from vllm_batch_server.engines.vllm import VLLMEngine
    from vllm_batch_server.engines.vllm_compat import load
    from vllm_batch_server.settings import Settings

    settings = Settings(models=[model], max_model_len=max_model_len)
    engine = VLLMEngine(settings)
    resolved = resolve(model, settings.model_cache_dir)
    # Exactly the engine arguments (dtype, eager mode, ...) and environment the server uses here.
    kwargs = engine._engine_kwargs(resolved)
    engine._prepare_environment(resolved)
    kwargs.pop("served_model_name", None)
    llm = load("LLM")(**kwargs)
    params = llm.get_default_sampling_params()
    params.temperature = 0.0
    params.max_tokens = max_tokens
    return list(llm.chat(convs, params, use_tqdm=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    convs = conversations(args.requests)
    with workdir(keep=args.keep, prefix="vllm-batch-parity-") as root:
        say(f"server: {args.requests} chat requests on {args.model} ...")
        began = time.perf_counter()
        served, run_s = server_answers(args.model, convs, args.max_tokens, root, args.max_model_len)
        server_s = time.perf_counter() - began
    say("offline LLM.chat on the same conversations ...")
    began = time.perf_counter()
    offline = offline_answers(args.model, convs, args.max_tokens, args.max_model_len)
    offline_s = time.perf_counter() - began

    mismatches: list[str] = []
    rows = []
    for i, out in enumerate(offline):
        body = served.get(f"req-{i}")
        if body is None:
            mismatches.append(f"req-{i}: missing from the server's output")
            continue
        choice = body["choices"][0]
        completion = out.outputs[0]
        same_text = choice["message"]["content"] == completion.text
        same_finish = choice["finish_reason"] == completion.finish_reason
        same_usage = (body["usage"]["prompt_tokens"] == len(out.prompt_token_ids or [])
                      and body["usage"]["completion_tokens"] == len(completion.token_ids))
        if not (same_text and same_finish and same_usage):
            mismatches.append(f"req-{i}: server {choice['message']['content']!r} ({choice['finish_reason']}, "
                              f"{body['usage']}) vs offline {completion.text!r} ({completion.finish_reason}, "
                              f"{len(out.prompt_token_ids or [])}+{len(completion.token_ids)} tokens)")
        if i < 5:
            rows.append([f"req-{i}", convs[i][0]["content"], completion.text[:60].replace("\n", " "),
                         "yes" if same_text else "NO"])
    print_table("first answers", ["id", "prompt", "answer", "equal"], rows)
    print_table("greedy parity", ["requests", "equal", "different", "server s (incl. start)", "offline s"],
                [[len(offline), len(offline) - len(mismatches), len(mismatches), server_s, offline_s]])
    write_results("greedy_parity", {"model": args.model, "requests": len(offline), "max_tokens": args.max_tokens,
                                    "different": mismatches, "server_s": server_s, "server_run_s": run_s,
                                    "offline_s": offline_s})
    for line in mismatches:
        print("DIFFERENT", line)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
