"""Label Studio for real: the tasks and labeling configuration the client exports are imported into a running Label
Studio, annotated through its API, exported by Label Studio as JSON and as JSON-MIN, and read back as marks.

Label Studio is large and pins its own versions of openai, numpy and Django, so it lives in a virtualenv of its
own, named by LABEL_STUDIO_BIN (or `label-studio` on PATH); the test is skipped without it:

    python3 -m venv /opt/label-studio && /opt/label-studio/bin/pip install label-studio
    LABEL_STUDIO_BIN=/opt/label-studio/bin/label-studio pytest tests/client_integration/test_label_studio.py

Its first start migrates a fresh database (a minute or two). Everything stays on loopback: update checks,
analytics and error reporting are switched off.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client_integration.conftest import CHAT_MODEL
from tests.helpers.server import RunningServer, free_port
from vllm_batch import VLLMBatch, label_studio_config

BINARY = os.environ.get("LABEL_STUDIO_BIN") or shutil.which("label-studio")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not BINARY, reason="Label Studio is not installed (set LABEL_STUDIO_BIN)")]
OFFLINE = {"SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
           "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false"}


@dataclass
class LabelStudio:
    url: str
    http: httpx.Client


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    assert BINARY is not None
    home = tmp_path_factory.mktemp("label-studio")
    port, token = free_port(), secrets.token_hex(20)
    url = f"http://127.0.0.1:{port}"
    log = open(home / "log", "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [BINARY, "start", "--no-browser", "--port", str(port), "--host", url, "--data-dir", str(home / "data"),
         "--username", "reviewer@example.com", "--password", secrets.token_hex(8), "--user-token", token,
         "--enable-legacy-api-token"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **OFFLINE},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Label Studio exited:\n{(home / 'log').read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio did not start:\n{(home / 'log').read_text()[-4000:]}")
            time.sleep(1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=120) as http:
            yield LabelStudio(url, http)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def annotation(label: str | None = None, rating: int | None = None, note: str | None = None,
               cancelled: bool = False) -> dict[str, Any]:
    result = []
    if label is not None:
        result.append({"from_name": "label", "to_name": "answer", "type": "choices", "value": {"choices": [label]}})
    if rating is not None:
        result.append({"from_name": "score", "to_name": "answer", "type": "rating", "value": {"rating": rating}})
    if note is not None:
        result.append({"from_name": "note", "to_name": "answer", "type": "textarea", "value": {"text": [note]}})
    return {"result": result, "was_cancelled": cancelled}


def test_tasks_into_label_studio_and_its_annotations_back_as_marks(label_studio: LabelStudio, server: RunningServer,
                                                                  tmp_path: Path) -> None:
    http = label_studio.http
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "w") as batch:
        for i in range(6):
            batch.add_to_batch(custom_id=f"t{i}", model=CHAT_MODEL, messages=[{"role": "user", "content": f"q{i}"}])
        batch.submit()
        batch.wait(poll_interval=0.3, progress=False, timeout=60)
        batch.mark("t0", label="gold", score=5)  # shown to reviewers as a prediction
        assert batch.export(tmp_path / "tasks.json", "label-studio") == 6

        project = http.post("/api/projects", json={"title": "vllm-batch review", "label_config": label_studio_config()})
        assert project.status_code == 201, project.text  # Label Studio accepted the configuration
        project_id = project.json()["id"]
        imported = http.post(f"/api/projects/{project_id}/import", content=(tmp_path / "tasks.json").read_bytes(),
                             headers={"content-type": "application/json"})
        assert imported.status_code == 201, imported.text
        assert (imported.json()["task_count"], imported.json()["prediction_count"]) == (6, 1)
        tasks = http.get("/api/tasks", params={"project": project_id, "page_size": 100}).json()["tasks"]
        by_id = {task["data"]["custom_id"]: task for task in tasks}
        assert by_id["t3"]["data"]["answer"] == "q3" and by_id["t3"]["data"]["batch_id"] == batch.id

        for custom_id, body in (("t1", annotation("reject", 2, "too vague")), ("t2", annotation("gold")),
                                ("t4", annotation("gold", cancelled=True)), ("t5", annotation(rating=4))):
            made = http.post(f"/api/tasks/{by_id[custom_id]['id']}/annotations/", json=body)
            assert made.status_code == 201, made.text

        expected = [("t0", "gold", 5.0, None), ("t1", "reject", 2.0, "too vague"), ("t2", "gold", None, None),
                    ("t5", None, 4.0, None)]
        for export_type in ("JSON", "JSON_MIN"):
            exported = http.get(f"/api/projects/{project_id}/export", params={"exportType": export_type})
            assert exported.status_code == 200, exported.text
            path = tmp_path / f"{export_type}.json"
            path.write_bytes(exported.content)
            for mark in batch.marks():
                if mark.custom_id != "t0":
                    batch.unmark(mark.custom_id)
            assert batch.import_label_studio(path) == 3, json.dumps(exported.json())[:2000]
            found = [(m.custom_id, m.label, m.score, m.note) for m in batch.marks()]
            assert found == expected, export_type
