"""Collect several pytest selections in one process: `python -m tests.helpers.collect '[["-m", "x"], [...]]'`
prints, as JSON, the node ids each argument list selects.

The suite's own setup tests compare selections (the halves CI splits the fast suite into, the two real-engine
runs); a `pytest --co` process each cost seconds of imports apiece, and after the first the modules are loaded.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest


class _Recorder:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def pytest_collection_finish(self, session: Any) -> None:
        self.ids = [item.nodeid for item in session.items]


def main(selections: list[list[str]]) -> list[list[str]]:
    found = []
    for args in selections:
        recorder = _Recorder()
        code = pytest.main(["--co", "-q", "-p", "no:cacheprovider", *args], plugins=[recorder])
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            raise SystemExit(f"collecting {args} failed: {code!r}")
        found.append(recorder.ids)
    return found


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    sys.stdout.flush()
    print("\n" + json.dumps(result))
