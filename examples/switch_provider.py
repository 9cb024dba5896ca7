"""The same batch code on the local server, on Parasail, or on OpenAI: only configuration changes.

    python examples/switch_provider.py                      # local server (or BATCH_BASE_URL)
    BATCH_PROVIDER=parasail PARASAIL_API_KEY=... MODEL=... python examples/switch_provider.py
    python examples/switch_provider.py --provider parasail  # the same, chosen in code

A key only ever goes to the host it belongs to: PARASAIL_API_KEY to api.parasail.io, BATCH_API_KEY to
BATCH_BASE_URL; a missing Parasail key is an error, never a fallback to OPENAI_API_KEY. Each provider's
limits (requests and bytes per batch, one model per batch or not) are applied automatically, and a big batch
is split into several when it must be.
"""

from __future__ import annotations

import argparse
import os

from vllm_batch import VLLMBatch


def classify(reviews: list[str], *, provider: str | None, model: str) -> list[tuple[str, str]]:
    # Nothing below depends on where the batch runs.
    with VLLMBatch(provider=provider, output_dir=os.environ.get("OUTPUT_DIR", "vllm-batch-output")) as batch:
        for review in reviews:
            batch.add_to_batch(
                model=model,
                messages=[
                    {"role": "system", "content": "Answer with one word: positive or negative."},
                    {"role": "user", "content": review},
                ],
                max_tokens=4,
                temperature=0.0,
            )
        batch.submit_wait_download(poll_interval=10)
        # A URL that is a vllm-batch-server on any port is recognised (it answers /health) and gets its limits.
        print(f"provider: {batch.provider.name} at {batch.provider.base_url} "
              f"(≤{batch.provider.max_requests:,} requests, ≤{batch.provider.max_bytes:,} bytes per batch)")
        labelled = []
        for r in batch.results():
            label = (r.text or "") if r.error is None else f"error: {r.error.message}"
            labelled.append((r.request["messages"][-1]["content"], label))
        return labelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=["local", "openai", "parasail"],
                        help="default: BATCH_PROVIDER, else BATCH_BASE_URL, else the local server")
    args = parser.parse_args()
    model = os.environ.get("MODEL", "smollm2-135m-instruct")
    reviews = ["Loved it, would buy again.", "Broke after two days.", "Exactly as described, fast delivery."]
    for review, label in classify(reviews, provider=args.provider, model=model):
        print(f"{label!r:>12}  {review}")


if __name__ == "__main__":
    main()
