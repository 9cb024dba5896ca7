# %% [markdown]
# # vllm-batch quickstart
#
# Run a chat batch on the local server and read the answers in the order you asked. Start the server
# first (`vllm-batch-server serve`); `BATCH_BASE_URL` points elsewhere, `MODEL` picks the chat model.
# Each `# %%` cell runs on its own in Jupyter or VS Code, or run the whole file: `python examples/quickstart.py`.

# %%
import os

from vllm_batch import VLLMBatch

MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")
questions = [
    "What is the capital of France?",
    "Give me a synonym for 'fast'.",
    "How many legs does a spider have?",
]

# %% Build the batch: each request is validated now and written to a local JSONL file.
batch = VLLMBatch()  # BATCH_BASE_URL, else http://localhost:4080/v1
for n, question in enumerate(questions):
    batch.add_to_batch(
        custom_id=f"question-{n}",
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0.0,
    )
print(f"{len(batch)} requests ready")

# %% Submit, wait (with a progress bar) and download — one call.
status, output_path, error_path = batch.submit_wait_download(poll_interval=5)
print(status.id, status.status, status.request_counts)
print("results file:", output_path)

# %% Results come back joined to their requests, in input order, errors included.
for result in batch.results():
    question = result.request["messages"][-1]["content"]
    answer = result.text if result.error is None else f"error: {result.error.message}"
    print(f"{result.custom_id}: {question!r} -> {answer!r}")

# %% The batch can be picked up again later, even from another process, by its id.
with VLLMBatch.resume(status.id) as again:
    print("resumed:", again.status().status)

batch.close()
