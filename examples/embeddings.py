"""Embeddings in a batch, then a tiny semantic search over them.

The client asks for base64-encoded embeddings where the provider supports it (about a quarter of the size
of JSON floats, which matters at a million texts) and decodes them back to floats in `results()`.
Reads BATCH_BASE_URL and EMBED_MODEL.

    python examples/embeddings.py
"""

from __future__ import annotations

import math
import os

from vllm_batch import VLLMBatch

EMBED_MODEL = os.environ.get("EMBED_MODEL", "all-minilm-l6-v2")

documents = {
    "tea": "How to brew green tea at the right temperature",
    "bike": "Fixing a flat tyre on a road bicycle",
    "bread": "A simple sourdough bread recipe for beginners",
    "train": "Commuting by train: tips for a quieter journey",
}
query = "baking at home"


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    with VLLMBatch(output_dir=os.environ.get("OUTPUT_DIR", "vllm-batch-output")) as batch:
        for key, text in documents.items():
            batch.add_to_batch(custom_id=key, model=EMBED_MODEL, input=text)
        batch.add_to_batch(custom_id="query", model=EMBED_MODEL, input=query)
        _, output_path, _ = batch.submit_wait_download(poll_interval=5)
        if output_path is not None:
            print(f"results file: {output_path} ({os.path.getsize(output_path):,} bytes)")
        vectors = {r.custom_id: r.embedding for r in batch.results() if r.ok and r.embedding}

    print(f"{len(vectors)} embeddings of dimension {len(vectors['query'])}")
    ranked = sorted(documents, key=lambda key: cosine(vectors["query"], vectors[key]), reverse=True)
    print(f"closest to {query!r}:")
    for key in ranked:
        print(f"  {cosine(vectors['query'], vectors[key]):+.3f}  {documents[key]}")


if __name__ == "__main__":
    main()
