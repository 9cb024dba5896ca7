"""One server per data directory: a second `serve` on the same directory is refused before it touches anything,
on another port or on the same one; a kill -9 leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, read_jsonl, sdk, submit, wait_for
from tests.helpers import rawhttp
from tests.helpers.server import RunningServer, free_port, make_server
from vllm_batch_server.store.data_dir_lock import LOCK_NAME


def second_server(first: RunningServer, port: int) -> subprocess.CompletedProcess[str]:
    """`serve` on the first server's data directory, as a user would start it by mistake; it must exit."""
    args = [a if a != str(first.port) else str(port) for a in first.args]
    return subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "serve", *args], env=first.env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("where", ["another port", "the same port"])
def test_a_second_server_on_the_same_data_dir_is_refused_and_harms_nothing(server_factory: ServerFactory,
                                                                           tmp_path: Path, where: str) -> None:
    journal = tmp_path / "computed.txt"
    first = server_factory(extra_args=["--echo-delay", "0.02", "--window", "4",
                                       "--echo-fault", f"journal={journal}"])
    client = sdk(first)
    lines = chat_lines(60)
    batch = submit(client, lines)
    wait_for(client, batch.id, ("in_progress",))

    # An upload in flight on the first server: half of it is in the upload area when the second one starts.
    payload = jsonl(chat_lines(200, prefix="up"))
    head, body = rawhttp.upload_request(first.port, payload)
    sock = rawhttp.connect(first.port)
    sock.sendall(head + body[: len(body) // 2])
    deadline = time.monotonic() + 10
    while not any((first.data_dir / "tmp").iterdir()):
        assert time.monotonic() < deadline, "the upload never reached the upload area"
        time.sleep(0.02)

    started = time.monotonic()
    refused = second_server(first, first.port if where == "the same port" else free_port())
    assert refused.returncode != 0
    assert time.monotonic() - started < 30
    assert "Traceback" not in refused.stderr + refused.stdout
    assert "in use by another vllm-batch-server" in refused.stderr
    assert first.process is not None
    assert f"pid {first.process.pid}" in refused.stderr and f"port {first.port}" in refused.stderr

    # The first server's upload finishes intact, and its batch runs exactly once.
    sock.sendall(body[len(body) // 2:])
    response = rawhttp.read_response(sock)
    sock.close()
    assert response.status == 200, response.body
    assert client.files.content(response.json()["id"]).content == payload
    done = wait_for(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == len(lines)
    assert sorted(r["custom_id"] for r in read_jsonl(client, done.output_file_id)) == sorted(
        line["custom_id"] for line in lines)
    computed = Counter(journal.read_text().split())
    assert len(computed) == len(lines) and set(computed.values()) == {1}


def test_a_killed_server_leaves_no_lock_behind(tmp_path: Path) -> None:
    server = make_server(tmp_path / "data").start()
    try:
        client = sdk(server)
        batch = submit(client, chat_lines(5))
        wait_for(client, batch.id)
        assert server.process is not None
        holder = json.loads((server.data_dir / LOCK_NAME).read_text())
        assert holder["pid"] == server.process.pid and holder["port"] == server.port
        server.kill()  # kill -9: the lock file stays, naming a dead process
        assert (server.data_dir / LOCK_NAME).exists()

        server.port = free_port()  # a restart on another port finds the directory free and takes it over
        server.args[server.args.index("--port") + 1] = str(server.port)
        server.start()
        assert json.loads((server.data_dir / LOCK_NAME).read_text())["port"] == server.port
        assert sdk(server).batches.retrieve(batch.id).status == "completed"
    finally:
        server.kill()


def test_the_lock_file_is_not_data(server_factory: ServerFactory) -> None:
    """It sits beside the database, never where uploads or results are scanned or cleaned."""
    server = server_factory()
    assert (server.data_dir / LOCK_NAME).is_file()
    for area in ("files", "tmp", "batches"):
        assert not list((server.data_dir / area).rglob(LOCK_NAME))
    assert sdk(server).files.list().data == []


def test_a_lock_left_with_a_child_of_a_dead_server_is_explained(tmp_path: Path) -> None:
    """A process forked from the server (an engine worker) keeps the lock after the server died: the message
    says so instead of naming a server that is not there."""
    data_dir = tmp_path / "data"
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from vllm_batch_server.store.data_dir_lock import locked\n"
        f"with locked(Path({str(data_dir)!r}), host='127.0.0.1', port=4999):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(30)\n"  # the child: holds the inherited descriptor, hence the lock
        "        os._exit(0)\n"
        "    print(child, flush=True)\n"
        "    os._exit(0)\n"  # the parent, the 'server', dies at once
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.wait(timeout=10)
    from vllm_batch_server.store.data_dir_lock import DataDirInUse, locked

    try:
        with pytest.raises(DataDirInUse) as caught, locked(data_dir):
            pass
        assert f"pid {parent.pid}" in str(caught.value) and "left behind" in str(caught.value)
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:  # free once the straggler is gone (the kernel closes its descriptors as it exits)
        try:
            with locked(data_dir):
                break
        except DataDirInUse:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_an_unusable_data_dir_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "serve", "--engine", "echo",
                           "--data-dir", str(blocker / "data"), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "cannot use the data directory" in done.stderr
    assert "Traceback" not in done.stderr
