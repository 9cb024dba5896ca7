"""CPU seconds per test, the pytest process and every process under it: `pytest -p tests.helpers.cpu_account`.

On 2 cores the suite's processes run side by side and every one is CPU-bound, so its wall time is its CPU seconds
over two: wall durations (`--durations`) say which tests wait, this says which tests cost. Each phase (setup, call,
teardown) counts its own CPU, the CPU its reaped children used, and what the processes still alive under it used
since the phase began (a server and its vLLM engine core, before the test's teardown kills them). Not counted: a
process killed by a signal to its group and never reaped by us (a vLLM engine core after `kill -9`), after the
last phase that saw it alive. Prints the 25 costliest tests; `BATCH_TEST_CPU=path` writes every test's seconds
as JSON lines.
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
    seconds: dict[int, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            seconds[child.pid] = times.user + times.system
        except psutil.Error:
            continue  # gone meanwhile: its parent's reaping counts it, or nothing can
    return seconds


def _phase(item: pytest.Item) -> Iterator[None]:
    own, alive = _own(), _descendants()
    try:
        yield
    finally:
        used = _own() - own
        for pid, seconds in _descendants().items():
            used += seconds - alive.get(pid, 0.0)
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
