"""From a batch to a small fine-tuning set: follow the answers as they come, mark the good ones, retry what
failed, export the gold answers for a trainer and the rest for review in Label Studio.

    python examples/curation.py        # against BATCH_BASE_URL, else http://localhost:4080/v1

Reads BATCH_BASE_URL and MODEL (default smollm2-135m-instruct). Needs the vllm-batch server (following,
retries and marks are its extensions to the Batch API). Writes gold.jsonl and review.json in the current
directory. See docs/results.md.
"""

from __future__ import annotations

import json
import os

from vllm_batch import ConflictError, VLLMBatch

MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")
SYSTEM = "Answer in one short sentence."
QUESTIONS = [
    "What is the boiling point of water at sea level?",
    "Name the largest planet in the solar system.",
    "What gas do plants take in?",
    "Who wrote Hamlet?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
]


def main() -> None:
    with VLLMBatch() as batch:
        for i, question in enumerate(QUESTIONS):
            batch.add_to_batch(custom_id=f"q{i}", model=MODEL, max_tokens=48, temperature=0,
                               messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        print(f"submitted {batch.submit()}")

        # 1. Read the answers while the batch runs: each one as soon as the server has committed it.
        answers = {}
        for result in batch.follow(poll_interval=2):
            answers[result.custom_id] = result
            shown = result.text if result.ok else f"<{result.error.code if result.error else 'error'}>"
            print(f"  {result.custom_id}: {shown!r}")
        print(f"followed {len(answers)} results")

        # 2. Retry only what failed (nothing, on a good day): same custom_ids, linked by metadata.retry_of.
        try:
            with batch.retry_failed() as again:
                again.wait(poll_interval=5, progress=False, raise_on_failure=False)
                print(f"retried the failures as {again.id}")
        except ConflictError as exc:
            print(f"nothing to retry ({exc.code})")

        # 3. Curate: here a simple rule stands in for a person (or use `vllm-batch mark` / the dashboard).
        for result in batch.merged_results():
            if result.ok and result.text and len(result.text) <= 200:
                batch.mark(result, label="gold", score=5)
            else:
                batch.mark(result, label="reject", note="too long or failed")
        print(f"marked {len(batch.marks(label='gold'))} gold")

        # 4. Export: gold answers as OpenAI chat fine-tuning data; everything else as Label Studio tasks.
        count = batch.export("gold.jsonl", labels="gold", with_retries=True)
        with open("gold.jsonl", encoding="utf-8") as fh:
            first = json.loads(fh.readline())
        print(f"wrote {count} training examples to gold.jsonl; roles: {[m['role'] for m in first['messages']]}")
        review = batch.export("review.json", "label-studio", exclude_labels="gold", errors=True)
        print(f"wrote {review} tasks to review.json for Label Studio")


if __name__ == "__main__":
    main()
