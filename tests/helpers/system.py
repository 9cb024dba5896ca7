"""Tests that start a system program (Chromium, PostgreSQL, Prometheus) for real.

`dev.py tests` installs the Debian/Ubuntu packages when they are missing. Where it could not, such a test skips
with the reason on a developer's machine; in CI (the CI environment variable set) it fails instead, so a run that
did not test what it claims cannot pass.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} (CI must run this test: `python3 dev.py tests` installs it on Debian/Ubuntu)",
                    pytrace=False)
    pytest.skip(reason)
