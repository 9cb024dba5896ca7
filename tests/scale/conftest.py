"""Echo backends as separate processes, and servers that route to them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import attach_log
from tests.helpers.backends import Backend, echo

BackendFactory = Callable[..., Backend]


@pytest.fixture
def echo_backend(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BackendFactory]:
    """Start an echo backend process (tests/helpers/echo_backend.py); all are killed at teardown."""
    started: list[Backend] = []

    def start(name: str, *args: str, **kwargs: Any) -> Backend:
        backend = echo(tmp_path / "backends", name, *args, **kwargs)
        started.append(backend)
        attach_log(request, f"backend {name}", backend.describe)
        return backend.start()

    yield start
    for backend in started:
        backend.kill()


def backend_args(*backends: Backend, window: int | None = 8, probe: float = 0.3,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """Server flags routing to these backends (fast health checks, as a test needs)."""
    args = ["--backend-probe-seconds", str(probe)]
    for backend in backends:
        args += ["--backend", backend.url + (f",window={window}" if window else "")]
    return [*args, *extra]
