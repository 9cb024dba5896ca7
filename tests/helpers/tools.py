"""System tools some tests drive (a real Prometheus, systemd-analyze, Chromium, PostgreSQL). Where one is
missing the test says which and how to install it: on a developer's machine it skips, in CI (CI=true) it fails,
because CI must run every test the issue's "done when" names, and a skip there would pass a run that checked
nothing. `python3 dev.py tests` installs the Debian/Ubuntu packages when they are missing."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_tool(message: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing tool fails the run instead of skipping)", pytrace=False)
    pytest.skip(message)
