"""Compare several models on the same prompts: submit tonight, read the table in the morning.

`models=[...]` sends every request to each model as its own batch (sharded if large), tracked as one; the
answers come back aligned by custom_id. The batch id is printed, so the comparison can be collected later
from another process with `VLLMBatch.resume(batch_id)`.

    COMPARE_MODELS=model-a,model-b,model-c python examples/compare_models.py

Reads BATCH_BASE_URL and COMPARE_MODELS (comma-separated; default: MODEL, or smollm2-135m-instruct).
"""

from __future__ import annotations

import os

from vllm_batch import VLLMBatch

MODELS = [m.strip() for m in os.environ.get(
    "COMPARE_MODELS", os.environ.get("MODEL", "smollm2-135m-instruct")).split(",") if m.strip()]

prompts = {
    "haiku": "Write a haiku about the sea.",
    "math": "What is 17 times 3?",
    "advice": "One tip for a job interview, in one sentence.",
}


def main() -> None:
    with VLLMBatch(models=MODELS) as batch:
        for key, prompt in prompts.items():
            # No model here: each request is sent to every model in MODELS.
            batch.add_to_batch(custom_id=key, messages=[{"role": "user", "content": prompt}], max_tokens=48)
        batch_id = batch.submit(metadata={"experiment": "compare"})
        print(f"submitted {batch_id} ({len(batch.batch_ids)} batches for {len(MODELS)} models)")

    # Later — tomorrow morning, in another process — pick it up by id.
    with VLLMBatch.resume(batch_id) as batch:
        batch.wait(poll_interval=60)
        for row in batch.compare():
            print(f"\n== {row.custom_id}: {row.request['messages'][-1]['content']}")
            for model, result in row.results.items():
                answer = result.text if result.error is None else f"<error: {result.error.message}>"
                print(f"  {model:>28}: {answer}")


if __name__ == "__main__":
    main()
