"""One server for an app and a batch: live requests answered while a batch runs on the same engine.

The batch goes to the Batch API as usual; the app talks to the same server's `/v1/chat/completions` with the
official openai SDK, streaming or not. Live requests run ahead of the batch's (vLLM's priority scheduling),
so the app stays responsive while the batch fills the rest of the engine. Online requests are answered by
the loaded model only: start the server with `--online-model MODEL` to keep it loaded; here the batch
loads it. Reads BATCH_BASE_URL, BATCH_API_KEY and MODEL.

    vllm-batch-server serve --online-model smollm2-135m-instruct &
    python examples/online.py
"""

from __future__ import annotations

import os
import time

import openai

from vllm_batch import VLLMBatch

MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")
BASE_URL = os.environ.get("BATCH_BASE_URL", "http://localhost:4080/v1")


def ask(app: openai.OpenAI, question: str) -> str:
    """An app's call, retried while the model is still loading (a 400 `model_not_loaded` names the loaded
    model: the server never switches models for an online request)."""
    for _ in range(600):
        try:
            answer = app.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                 max_tokens=32)
            return answer.choices[0].message.content or ""
        except openai.BadRequestError as exc:
            if exc.code != "model_not_loaded":
                raise
        except openai.InternalServerError:  # 503 while the model loads
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{MODEL} was never loaded")


def main() -> None:
    app = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("BATCH_API_KEY") or "unused")
    with VLLMBatch() as batch:
        for n in range(200):
            batch.add_to_batch(custom_id=f"doc-{n}", model=MODEL, max_tokens=32,
                               messages=[{"role": "user", "content": f"Summarise document number {n}."}])
        batch.submit()
        print(f"batch {batch.id} submitted: 200 requests")

        print("online:", ask(app, "What is the capital of France?"))
        stream = app.chat.completions.create(model=MODEL, stream=True, max_tokens=32,
                                             messages=[{"role": "user", "content": "Say hello to the team."}])
        print("streamed:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))

        status = batch.wait(poll_interval=1, progress=False)
        print(f"batch: {status.status}, {status.request_counts.completed} of {status.request_counts.total} done")


if __name__ == "__main__":
    main()
