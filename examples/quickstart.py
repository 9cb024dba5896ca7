# %% [markdown]
# # vllm-batch quickstart
#
# A chat batch and an embeddings batch on your own machine, answers read back in the order you asked.
#
# It uses the server at `BATCH_BASE_URL` if set, else one already running on localhost:4080, else it starts
# `vllm-batch-server serve` for the length of this script (loading a model takes about half a minute on a
# CPU; the progress bar says when the server is loading one). Its log goes to the server's data folder
# (`BATCH_SERVER_DATA_DIR`, default ~/.local/share/vllm-batch). Result files go to `OUTPUT_DIR` (default
# ./vllm-batch-output). `MODEL` and `EMBED_MODEL` pick the models. Each `# %%` cell runs on its own in
# Jupyter or VS Code, or run the whole file: `python examples/quickstart.py`.

# %%
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vllm_batch import VLLMBatch

MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")
EMBED_MODEL = os.environ.get("EMBED_MODEL", "all-minilm-l6-v2")
OUTPUT_DIR = Path(os.environ.get("OUTPUT_DIR", "vllm-batch-output"))
# Where the server keeps its data unless told otherwise (the same rule as `vllm-batch-server serve`).
DATA_DIR = Path(os.environ.get("BATCH_SERVER_DATA_DIR")
                or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vllm-batch")


def ensure_server() -> None:
    """Point BATCH_BASE_URL at a running server, starting one if there is none."""
    if os.environ.get("BATCH_BASE_URL"):
        return
    port = os.environ.get("BATCH_SERVER_PORT", "4080")  # the server reads the same variable
    root = f"http://localhost:{port}"
    os.environ["BATCH_BASE_URL"] = f"{root}/v1"
    try:
        if httpx.get(f"{root}/health", timeout=2).status_code == 200:
            return
    except httpx.HTTPError:
        pass
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    log_path = DATA_DIR / "quickstart-server.log"
    print(f"starting vllm-batch-server on {root} (log: {log_path})")
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm_batch_server.cli", "serve", "--port", port, "--data-dir", str(DATA_DIR),
             "--model", MODEL, "--model", EMBED_MODEL],
            stdout=log, stderr=subprocess.STDOUT,
        )

    def stop() -> None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    atexit.register(stop)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited; see {log_path}")
        try:
            if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not come up; see {log_path}")


ensure_server()
print("server:", os.environ["BATCH_BASE_URL"])

# %% Build a chat batch: each request is validated now and written to a local JSONL file.
countries = ["France", "Japan", "Brazil", "Canada", "Egypt", "Norway", "Kenya", "Chile", "India", "Spain",
             "Peru", "Italy"]
words = ["fast", "happy", "big", "cold", "smart", "quiet", "brave", "old", "bright", "calm", "rich", "tired"]
animals = ["a spider", "a dog", "a bird", "an ant", "a horse", "a snake", "a crab", "a fish", "a cow", "a duck",
           "a bee", "a frog"]
questions = (
    [f"What is the capital of {country}?" for country in countries]
    + [f"Give me a synonym for '{word}'." for word in words]
    + [f"How many legs does {animal} have?" for animal in animals]
)
chat = VLLMBatch(output_dir=OUTPUT_DIR)  # reads BATCH_BASE_URL
for n, question in enumerate(questions):
    chat.add_to_batch(
        custom_id=f"question-{n}",
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0.0,
    )
print(f"{len(chat)} requests ready")

# %% Submit, wait (with a progress bar) and download — one call.
status, output_path, error_path = chat.submit_wait_download(poll_interval=5)
print(status.id, status.status, status.request_counts)
print("results file:", output_path)

# %% Results come back joined to their requests, in input order, errors included.
SHOWN = 8
for result in chat.results():
    if result.index >= SHOWN:
        continue
    question = result.request["messages"][-1]["content"]
    answer = result.text if result.error is None else f"error: {result.error.message}"
    print(f"{result.custom_id}: {question!r} -> {answer!r}")
print(f"... and {len(questions) - SHOWN} more in {output_path}")

# %% The batch can be picked up again later, even from another process, by its id.
with VLLMBatch.resume(status.id) as again:
    print("resumed:", again.status().status)
chat.close()

# %% Embeddings: sent as base64 (smaller files), decoded to floats for you.
sentences = ["A cat sleeps on the sofa.", "A kitten naps on the couch.", "Stock markets fell today."]
with VLLMBatch(output_dir=OUTPUT_DIR) as embed:
    for sentence in sentences:
        embed.add_to_batch(model=EMBED_MODEL, input=sentence)
    embed.submit_wait_download(poll_interval=5)
    vectors = [r.embedding for r in embed.results() if r.embedding is not None]


def similarity(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


print(f"{len(vectors)} embeddings of dimension {len(vectors[0])}")
for i in range(1, len(sentences)):
    print(f"similarity({sentences[0]!r}, {sentences[i]!r}) = {similarity(vectors[0], vectors[i]):+.3f}")
