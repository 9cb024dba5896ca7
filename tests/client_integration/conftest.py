"""Echo-engine servers for the client's integration tests: the app in this process (`app`, reached through the
client's own `http_client=` argument) or a real server on loopback (`server`, for a client in another process:
the CLI, the examples, a resume from a subprocess)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.inprocess import InProcessServer, make_app
from tests.helpers.server import RunningServer, make_server

CHAT_MODEL = "echo-model"
EMBED_MODEL = "echo-embed"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One echo server per test module."""
    running = make_server(tmp_path_factory.mktemp("client-server") / "data").start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """One echo app in this process per test module."""
    running = make_app(tmp_path_factory.mktemp("client-app") / "data").start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATCH_BASE_URL", "BATCH_API_KEY", "BATCH_PROVIDER", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ask(text: str, model: str = CHAT_MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
