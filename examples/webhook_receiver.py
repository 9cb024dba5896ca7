"""A webhook receiver that verifies batch events with the official openai SDK, as it would OpenAI's own.

vllm-batch signs its webhooks per Standard Webhooks, like OpenAI, so the receiver you write for OpenAI's
`batch.completed` works unchanged: `client.webhooks.unwrap(body, headers)` checks the signature and the
timestamp and returns the typed event. Deliveries are at least once: keep the `webhook-id` of what you
handled and drop repeats.

    python examples/webhook_receiver.py            # a demo: starts an echo-engine server that sends its
                                                   # webhooks here, runs a batch, prints the event, stops
    python examples/webhook_receiver.py --listen 8088   # only the receiver, until Ctrl-C; then start
    vllm-batch-server serve --webhook "http://127.0.0.1:8088/webhooks secret=$WEBHOOK_SECRET"

The secret comes from WEBHOOK_SECRET (`vllm-batch-server webhooks new-secret` makes one).
"""

from __future__ import annotations

import argparse
import base64
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import httpx
import openai

from vllm_batch import VLLMBatch


def make_handler(secret: str, events: queue.Queue[Any]) -> type[BaseHTTPRequestHandler]:
    client = openai.OpenAI(api_key="not-needed-to-verify", webhook_secret=secret)
    handled: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                event = client.webhooks.unwrap(body, dict(self.headers))
            except openai.InvalidWebhookSignatureError as exc:
                print(f"refused a request that is not signed with our secret: {exc}")
                self.send_response(400)
                self.end_headers()
                return
            delivery = self.headers["webhook-id"]
            if delivery not in handled:  # at least once: a repeat of a handled delivery is acknowledged only
                handled.add(delivery)
                print(f"verified {event.type} for {event.data.id} (event {event.id}, delivery {delivery})")
                events.put(event)
            self.send_response(204)  # answer quickly; do slow work elsewhere
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo(secret: str, receiver_port: int, events: queue.Queue[Any]) -> None:
    """An echo-engine server configured to send its batch events to this receiver; one small batch."""
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="vllm-batch-webhook-demo-")
    hook = f"http://127.0.0.1:{receiver_port}/webhooks secret={secret}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm_batch_server.cli", "serve", "--engine", "echo", "--model", "echo-model",
         "--port", str(port), "--data-dir", data_dir, "--webhook", hook],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(root + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("the demo server did not start") from None
                time.sleep(0.2)
        print(f"demo server on {root}, sending webhooks to http://127.0.0.1:{receiver_port}/webhooks")
        with VLLMBatch(base_url=root + "/v1", api_key="unused", workdir=data_dir, output_dir=data_dir) as batch:
            for i in range(3):
                batch.add_to_batch(model="echo-model", messages=[{"role": "user", "content": f"Hello {i}"}])
            finished, _, _ = batch.submit_wait_download(poll_interval=0.5, progress=False)
            (batch_id,) = finished.batch_ids
            print(f"batch {batch_id} {finished.status}")
        event = events.get(timeout=30)
        assert event.type == "batch.completed" and event.data.id == batch_id
        print("the webhook arrived, verified: done")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, metavar="PORT", help="only receive, on this port, until Ctrl-C")
    args = parser.parse_args()
    secret = os.environ.get("WEBHOOK_SECRET") or "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    events: queue.Queue[Any] = queue.Queue()
    port = args.listen or free_port()
    receiver = ThreadingHTTPServer(("127.0.0.1", port), make_handler(secret, events))
    Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        if args.listen:
            print(f"receiving on http://127.0.0.1:{port}/webhooks (secret from WEBHOOK_SECRET); Ctrl-C to stop")
            while True:
                time.sleep(3600)
        else:
            demo(secret, port, events)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.shutdown()


if __name__ == "__main__":
    main()
