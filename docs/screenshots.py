"""Regenerate the dashboard screenshots in docs/img/ (`nox -s screenshots`, or `python docs/screenshots.py`).

Starts a real server (echo engine, with an API key) on a scratch data directory, fills it with a few batches
in different states through the API, and photographs each view in headless Chromium (Debian's `chromium`;
set BATCH_TEST_CHROMIUM for another binary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from benchmarks._harness import Server, say, workdir  # noqa: E402

KEY = "sk-screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def line(custom_id: str, text: str, *, model: str = "echo-model", url: str = "/v1/chat/completions",
         broken: bool = False) -> dict[str, Any]:
    if url == "/v1/embeddings":
        body: dict[str, Any] = {"model": model, "input": text}
    else:
        body = {"model": model, "messages": [] if broken else [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


class Api:
    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url + "/v1", headers={"authorization": f"Bearer {KEY}"}, timeout=60)

    def submit(self, data: bytes, name: str | None = None, endpoint: str = "/v1/chat/completions") -> str:
        file_id = self.http.post("/files", data={"purpose": "batch"},
                                 files={"file": ("input.jsonl", data)}).raise_for_status().json()["id"]
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        if name:
            body["metadata"] = {"name": name, "team": "evals"}
        return str(self.http.post("/batches", json=body).raise_for_status().json()["id"])

    def wait(self, batch_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled")) -> None:
        deadline = time.monotonic() + 120
        while (status := self.http.get(f"/batches/{batch_id}").json()["status"]) not in statuses:
            if time.monotonic() > deadline or status in ("completed", "failed", "cancelled", "expired"):
                raise RuntimeError(f"batch {batch_id} is {status}, not {' or '.join(statuses)}")
            time.sleep(0.1)


def populate(api: Api) -> dict[str, str]:
    chats = [line(f"q-{i}", f"Summarize document number {i} in three sentences.") for i in range(400)]
    made = {}
    made["embeddings"] = api.submit(jsonl([line(f"e-{i}", f"passage {i}", model="echo-embed",
                                                url="/v1/embeddings") for i in range(300)]),
                                    "index-passages", "/v1/embeddings")
    api.wait(made["embeddings"])
    flaky = chats[:180] + [line(f"bad-{i}", "", broken=True) for i in range(12)]
    made["completed"] = api.submit(jsonl(flaky), "nightly-eval")
    api.wait(made["completed"])
    made["failed"] = api.submit(b'{"custom_id": "a", "method": "POST"}\nnot json\n' + jsonl(chats[:3]))
    api.wait(made["failed"])
    made["cancelled"] = api.submit(jsonl(chats), "abandoned-sweep")
    api.wait(made["cancelled"], ("in_progress",))
    api.http.post(f"/batches/{made['cancelled']}/cancel").raise_for_status()
    api.wait(made["cancelled"])
    many = [line(f"s-{i}", f"Summarize document number {i} in three sentences.") for i in range(6000)]
    made["running"] = api.submit(jsonl(many), "summaries-2026-11")
    api.wait(made["running"], ("in_progress",))
    made["queued"] = api.submit(jsonl(chats[:50]), "follow-up")
    return made


def shoot(page: Page, out: Path, name: str, *, full: bool = True) -> None:
    page.wait_for_timeout(600)  # let a poll or two land, for live rates
    page.screenshot(path=str(out / f"{name}.png"), full_page=full)
    say(f"docs/img/{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--chromium", default=os.environ.get("BATCH_TEST_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with workdir(prefix="vllm-batch-shots-") as scratch:
        server = Server(scratch / "data", extra_args=["--api-key", KEY, "--echo-delay", "0.05", "--window", "2"])
        with server.start(), sync_playwright() as playwright:
            made = populate(Api(server.base_url))
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
            page = context.new_page()
            page.goto(server.base_url + "/")
            page.wait_for_selector("#sign-in-form")
            shoot(page, args.out, "sign-in", full=False)
            page.fill("#api-key", KEY)
            page.click("#sign-in")
            page.wait_for_selector(f"tr[data-id='{made['running']}'] .rps:not(:text('—'))")
            shoot(page, args.out, "queue")
            page.goto(f"{server.base_url}/#/batches/{made['running']}")
            page.wait_for_selector("[data-fact=eta] .value:not(:text('—'))", timeout=60_000)
            shoot(page, args.out, "batch-running")
            page.goto(f"{server.base_url}/#/batches/{made['completed']}")
            page.wait_for_selector("#request-errors")
            shoot(page, args.out, "batch-errors")
            page.goto(f"{server.base_url}/#/new")
            page.set_input_files("#file", files=[{"name": "broken.jsonl", "mimeType": "application/jsonl",
                                                  "buffer": b'{"custom_id": "a", "method": "POST"}\nnot json\n'}])
            page.fill("#job-name", "first try")
            page.click("#create")
            page.wait_for_selector("#create-validation-errors")
            shoot(page, args.out, "create-validation")
            phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            phone_page = phone.new_page()
            phone_page.goto(server.base_url + "/")
            phone_page.evaluate(f"sessionStorage.setItem('vllm-batch.api-key', {json.dumps(KEY)})")
            phone_page.reload()
            phone_page.wait_for_selector("#queue tbody tr")
            shoot(phone_page, args.out, "queue-phone", full=False)
            dark = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="dark")
            dark_page = dark.new_page()
            dark_page.goto(server.base_url + "/")
            dark_page.evaluate(f"sessionStorage.setItem('vllm-batch.api-key', {json.dumps(KEY)})")
            dark_page.goto(f"{server.base_url}/#/batches/{made['running']}")
            dark_page.reload()
            dark_page.wait_for_selector("[data-fact=eta] .value:not(:text('—'))", timeout=60_000)
            shoot(dark_page, args.out, "batch-dark", full=False)
            browser.close()
            Api(server.base_url).http.post(f"/batches/{made['running']}/cancel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
