"""What a stop we cause leaves on the real engine, on the session's shared server.

Named to run after test_online.py, which leaves the chat model loaded: this needs it, and a switch costs a
model load (~30 s on 2 cores)."""

from __future__ import annotations

import pytest

from tests.conftest import TERMINAL, sdk, submit, wait_for
from tests.faults.checks import assert_cancel_left_no_failure
from tests.helpers.server import RunningServer
from tests.vllm.conftest import BATCH_TIMEOUT, QUESTIONS, chat_line

pytestmark = pytest.mark.vllm


def test_a_cancel_records_no_failure_for_what_it_stopped(vllm_server: RunningServer) -> None:
    """Issue 26: cancelling a running batch on vLLM wrote one `400 "Client disconnected"` line per request in
    flight — vLLM's answer to our own abort — so the batch read `cancelled, 19 completed, 81 failed`. What the
    cancel stopped has no line: the counts show only what completed, and there is no error file. A few short
    requests finish first; the rest run long (ignore_eos) so that the cancel finds them in flight."""
    client = sdk(vllm_server, timeout=60)
    lines = [chat_line(f"short-{i}", QUESTIONS[i], max_tokens=4) for i in range(6)]
    lines += [chat_line(f"long-{i}", f"Count slowly from {i} upwards.", max_tokens=128, ignore_eos=True)
              for i in range(54)]
    batch = submit(client, lines)
    wait_for(client, batch.id, timeout=BATCH_TIMEOUT, until=lambda b: b.status in TERMINAL or (
        b.request_counts is not None and b.request_counts.completed >= 3))
    client.batches.cancel(batch.id)
    done = wait_for(client, batch.id, timeout=120)

    assert_cancel_left_no_failure(client, done, at_least=3, total=len(lines))
