"""A missing system tool (Prometheus, systemd-analyze, Chromium, PostgreSQL) skips a test on a developer's
machine and fails it in CI."""

from __future__ import annotations

import pytest

from tests.helpers.tools import missing_tool


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"no prometheus.*CI=true"):
        missing_tool("no prometheus")


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_tool_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no prometheus"):
        missing_tool("no prometheus")
