"""The in-process tier: the real app (`create_app`), built from the same CLI flags a test would give a server
process, run with its lifespan in this process, and reached through Starlette's TestClient transport.

Why TestClient rather than httpx's ASGITransport: the tests talk through the official openai SDK, which is
synchronous, and ASGITransport is async-only and runs no lifespan; TestClient used as a context manager runs the
lifespan (database, scheduler, engine, observers) on an event loop in a background thread, which keeps running
between requests, so batches complete while the test thread polls, just as with a server process. Through a small
sync transport (_AppTransport) any `httpx.Client`, and so `openai.OpenAI(http_client=...)`, reaches it.

What this tier cannot show, and the process tier (tests/helpers/server.py) keeps: kill -9 and restarts, signals and
graceful stops, the CLI itself, sockets (connection limits, slow clients, descriptors), the log file, the data-dir
lock against another process. Event streams that never end are kept on processes too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from starlette import testclient
from starlette.testclient import TestClient

from vllm_batch_server.app import create_app
from vllm_batch_server.cli import build_parser, settings_from_args
from vllm_batch_server.settings import Settings

ROOT_URL = "http://testserver"
ENV_PREFIX = "BATCH_"
APP_THREADS = re.compile(r"^asyncio-portal|^asyncio_|^AnyIO worker|_connection_worker_thread|^handler-|"
                         r"^ThreadPoolExecutor")


class _AppTransport(httpx.BaseTransport):
    """An httpx transport onto the running app. Starlette's TestClient is built on its own httpx (httpx2 since
    Starlette 1.0), while the openai SDK and the tests use httpx: each request is handed to the TestClient as it
    came (method, raw path, headers, body, no redirect followed) and its answer handed back undecoded, so httpx
    decodes it as it would a socket's. Answers are read whole, which is why endless event streams stay on the
    process tier. Closing a client that uses it (`with sdk(server) as c:`) leaves the app alone: the
    InProcessServer owns it."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # A body sent chunked (no Content-Length) reaches the app chunk by chunk, as from a socket.
        chunked = "content-length" not in request.headers and "transfer-encoding" in request.headers
        body: Any = iter(request.stream) if chunked else request.read()  # type: ignore[call-overload]
        # The path exactly as it would go on the wire (`..%2f`, `//`, `%zz` untouched): not re-parsed from text.
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        url = testclient.httpx.URL(origin, raw_path=request.url.raw_path)
        with self._client.stream(request.method, url, headers=request.headers.multi_items(),
                                 content=body, follow_redirects=False) as answer:
            raw = b"".join(answer.iter_raw())
        return httpx.Response(answer.status_code, headers=answer.headers.multi_items(),
                              stream=httpx.ByteStream(raw), request=request)

    def close(self) -> None:
        pass


class _AsyncAppTransport(httpx.AsyncBaseTransport):
    """The same onto the app for an `httpx.AsyncClient` (so `openai.AsyncOpenAI` and AsyncVLLMBatch): the body is
    read on the caller's loop, the request handed to the sync transport in a worker thread, so the caller's loop
    keeps running (concurrent requests stay concurrent, up to the default executor's threads)."""

    def __init__(self, client: TestClient) -> None:
        self._sync = _AppTransport(client)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return await asyncio.to_thread(self._sync.handle_request, request)


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ as a server process started by make_server sees it: no BATCH_* variable from the developer's
    shell, plus `env`; a PYTHONPATH in `env` is put in front of sys.path, as it would be in the process (for result
    handlers imported by name). Both restored on exit."""
    saved, saved_path = dict(os.environ), list(sys.path)
    try:
        if env.get("PYTHONPATH"):
            sys.path[:0] = [entry for entry in env["PYTHONPATH"].split(os.pathsep) if entry]
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.path[:] = saved_path


def server_args(data_dir: Path, *, engine: str = "echo", models: list[str] | None = None,
                extra_args: list[str] | None = None, api_key: str | None = None) -> list[str]:
    """The `serve` flags make_server would give the process (less --host/--port, which mean nothing here)."""
    args = ["--data-dir", str(data_dir), "--engine", engine]
    for model in models or (["echo-model", "echo-embed"] if engine == "echo" else []):
        args += ["--model", model]
    if api_key:
        args += ["--api-key", api_key]
    return args + (extra_args or [])


def settings_from_flags(args: list[str]) -> Settings:
    """Settings exactly as `vllm-batch-server serve ARGS` builds them: the CLI's own parser and conversion."""
    return settings_from_args(build_parser().parse_args(["serve", *args]))


@dataclass
class InProcessServer:
    """The same conveniences as RunningServer (api_key, root_url, base_url, data_dir, http, start/stop), for the
    app running in this process."""

    data_dir: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    settings: Settings | None = None
    starts: int = 0
    _client: TestClient | None = None
    _http: httpx.Client | None = None
    _threads_before: set[threading.Thread] = field(default_factory=set)
    _env: Any = None
    _log: list[str] = field(default_factory=list)
    _handler: logging.Handler | None = None
    _saved_level: int = logging.NOTSET

    base_url = ROOT_URL + "/v1"
    root_url = ROOT_URL

    def start(self) -> InProcessServer:
        assert self._client is None, "already started"
        self.starts += 1
        self._threads_before = set(threading.enumerate())
        self._capture_log()
        self._env = environment(self.env)
        self._env.__enter__()
        try:
            self.settings = settings_from_flags(self.args)
            # raise_server_exceptions=False: an unexpected error is answered 500 in the API's shape, as a server
            # process answers it, instead of being raised into the test.
            client = TestClient(create_app(self.settings), base_url=ROOT_URL, raise_server_exceptions=False)
            client.__enter__()  # runs the lifespan's start-up; its loop thread runs until stop()
        except BaseException:
            self._env.__exit__(None, None, None)
            self._release_log()
            raise
        self._client = client
        self._http = httpx.Client(transport=self.transport, base_url=ROOT_URL, timeout=30)
        return self

    @property
    def transport(self) -> httpx.BaseTransport:
        """A transport to the running app, for any httpx.Client."""
        assert self._client is not None, "not started"
        return _AppTransport(self._client)

    @property
    def http(self) -> httpx.Client:
        """A plain httpx client on the app (base_url is the root, so `http.get("/metrics")` works, and so do
        absolute URLs built from root_url or base_url)."""
        assert self._http is not None, "not started"
        return self._http

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """A new httpx client on the app, for a test's own `with ... as http:`; closing it leaves the app alone."""
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("base_url", ROOT_URL)
        return httpx.Client(transport=self.transport, **kwargs)

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """A new async httpx client on the app (for `openai.AsyncOpenAI(http_client=...)`, AsyncVLLMBatch)."""
        assert self._client is not None, "not started"
        kwargs.setdefault("timeout", 30)
        return httpx.AsyncClient(transport=_AsyncAppTransport(self._client), **kwargs)

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, http_client=httpx.Client(transport=self.transport), **kwargs)

    def alive(self) -> bool:
        """What `process.poll() is None` shows of a server process: the app's event loop still runs."""
        return self._client is not None and self._client.portal is not None and not self._client.task.done()

    def log(self) -> str:
        """The app's log lines (the vllm_batch_server loggers, INFO and up, as the server process writes them),
        the last 8000 characters like RunningServer.log()."""
        return "".join(self._log)[-8000:]

    def describe(self) -> str:
        return "in-process app, " + ("running" if self._client is not None else "stopped") + "\n" + self.log()

    def _capture_log(self) -> None:
        lines = self._log

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(self.format(record) + "\n")

        self._handler = Collect(logging.INFO)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("vllm_batch_server")
        self._saved_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self._handler)

    def _release_log(self) -> None:
        if self._handler is not None:
            logger = logging.getLogger("vllm_batch_server")
            logger.removeHandler(self._handler)
            logger.setLevel(self._saved_level)
            self._handler = None

    def stop(self) -> None:
        """The lifespan's shutdown (scheduler, observers, database), then the loop thread ends."""
        client, self._client = self._client, None
        if client is None:
            return
        if self._http is not None:
            self._http.close()
            self._http = None
        try:
            client.__exit__(None, None, None)
        finally:
            self._env.__exit__(None, None, None)
            self._release_log()
        self._check_no_thread_left()

    kill = stop  # there is no kill -9 in-process: tests that need one stay on the process tier

    def _check_no_thread_left(self, grace: float = 10.0) -> None:
        """The threads the app runs on (the portal's event loop, its executors, aiosqlite's connection, the result
        handlers' pools) all end with its shutdown. Other new threads are the test's own (a webhook receiver
        torn down after the app, say), so only these families are checked, by the names they are given."""
        deadline = time.monotonic() + grace
        while True:
            left = [t for t in threading.enumerate()
                    if t not in self._threads_before and t.is_alive() and APP_THREADS.search(t.name)]
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the app left threads running after its shutdown: {left}")
            time.sleep(0.05)


def make_app(data_dir: Path, *, engine: str = "echo", models: list[str] | None = None,
             extra_args: list[str] | None = None, api_key: str | None = None,
             env: dict[str, str] | None = None) -> InProcessServer:
    """Build (not start) an in-process app with its data in `data_dir`; the arguments are make_server's."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return InProcessServer(data_dir=data_dir, args=server_args(data_dir, engine=engine, models=models,
                                                                extra_args=extra_args, api_key=api_key),
                           env=dict(env or {}), api_key=api_key)
