"""CPU seconds per test, the pytest process and every process under it: `pytest -p tests.helpers.cpu_account`.

On 2 cores the suite's processes run side by side and every one is CPU-bound, so its wall time is its CPU seconds
over two: wall durations (`--durations`) say which tests wait, this says which tests cost. Each phase (setup, call,
teardown) counts its own CPU, the CPU its reaped children used, and what the processes still alive under it used
since the phase began (a server and its vLLM engine core, before the test's teardown kills them). A process that
ends is counted once: what earlier phases saw it use is taken back when its reaper's totals take it in (a
session's server, or Chromium, stopped after the last test, costs that test only its last seconds). Not counted
at all: a process killed together with its parent, which then never reaps it (a vLLM engine core under `kill -9`
of its server's process group); the machine's own CPU counters (/proc/stat) measure such tests.
Prints the 25 costliest tests; `BATCH_TEST_CPU=path` writes every test's seconds as JSON lines.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

_totals: dict[str, float] = {}


def _own() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _descendants() -> dict[int, float]:
    """Each live process under this one: its CPU seconds, with what it reaped (which then leaves the list)."""
    seconds: dict[int, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue  # gone meanwhile: its parent's reaping counts it, or nothing can
        seconds[child.pid] = times.user + times.system + times.children_user + times.children_system
    return seconds


def _phase(item: pytest.Item) -> Iterator[None]:
    own, alive = _own(), _descendants()
    try:
        yield
    finally:
        now = _descendants()
        used = _own() - own + sum(seconds - alive.get(pid, 0.0) for pid, seconds in now.items())
        for pid, seconds in alive.items():
            # Ended: its reaper's totals (ours, or those of a live ancestor) hold all of it now, including the part
            # seen before this phase began, which was counted then.
            if pid not in now:
                used -= seconds
        _totals[item.nodeid] = _totals.get(item.nodeid, 0.0) + max(used, 0.0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    yield from _phase(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield from _phase(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield from _phase(item)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _totals:
        return
    if target := os.environ.get("BATCH_TEST_CPU"):
        with Path(target).open("a") as out:
            for nodeid, seconds in _totals.items():
                out.write(json.dumps({"test": nodeid, "cpu_seconds": round(seconds, 2)}) + "\n")
    terminalreporter.section("CPU seconds: the 25 costliest tests (tests/helpers/cpu_account.py)")
    for nodeid, seconds in sorted(_totals.items(), key=lambda kv: -kv[1])[:25]:
        terminalreporter.write_line(f"{seconds:8.1f}s  {nodeid}")
    terminalreporter.write_line(f"{sum(_totals.values()):8.1f}s  in all, {len(_totals)} tests")
