"""The backup procedure of docs/deployment.md, followed to the letter while a batch runs: SQLite's online backup
of the database first, then the blobs. A server started on the restored copy resumes the batch, and every
request ends up with exactly one result."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from tests.conftest import ServerFactory, chat_lines, read_jsonl, sdk, submit, wait_for
from tests.helpers.server import make_server


def test_an_online_backup_restores_and_resumes(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.005", "--window", "4", "--checkpoint-every", "20"])
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(20, prefix="done")).id)
    running = wait_for(client, submit(client, chat_lines(2000)).id, until=lambda b: b.request_counts.completed > 100)

    # 1. the database, consistent, while the server runs
    copy = tmp_path / "restored"
    copy.mkdir()
    source = sqlite3.connect(server.data_dir / "vllm-batch.sqlite3")
    target = sqlite3.connect(copy / "vllm-batch.sqlite3")
    source.backup(target)
    target.close()
    source.close()
    # 2. then the blobs (the server goes on writing meanwhile)
    for name in ("files", "batches"):
        shutil.copytree(server.data_dir / name, copy / name)
    server.kill()

    restored = make_server(copy).start()
    try:
        client = sdk(restored)
        assert client.batches.retrieve(done.id).status == "completed"
        assert len(read_jsonl(client, done.output_file_id)) == 20
        finished = wait_for(client, running.id, timeout=60)
        assert finished.status == "completed" and finished.request_counts.completed == 2000
        ids = [line["custom_id"] for line in read_jsonl(client, finished.output_file_id)]
        assert sorted(ids) == sorted(f"req-{i}" for i in range(2000))  # each exactly once
    finally:
        restored.kill()
