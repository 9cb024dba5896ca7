"""HTTP connections: deadlines for what a client owes the server, and a cap on how many are open.

uvicorn closes a kept-alive connection that stays idle after a response, and nothing else: a connection that
never sends a request, that sends its headers a byte a minute, or that goes quiet after the server answered
before reading the whole body (a refused upload) is held forever, with its descriptor. Enough of them and the
server cannot open the files a batch needs. So, on top of uvicorn's httptools protocol:

- **Header deadline**: a request's line and headers must arrive within `header_timeout` seconds of the
  connection opening (or of the request's first byte, on a kept-alive connection). A connection that sent
  nothing is then closed; one that sent part of a request gets a 408 first. Headers are also capped at
  MAX_HEAD_BYTES (431): httptools itself accepts headers of any size.
- **Keep-alive**: uvicorn's own timer, with `keep_alive_timeout`.
- **Draining**: when the answer went out before the body was read whole, uvicorn keeps reading (and dropping) the
  rest so the client gets to see the answer rather than a reset; that drain is cut off after `body_idle_timeout`
  seconds without a byte.
- **Slow readers**: a response the client stops reading (the socket's send buffer stays full) for
  `body_idle_timeout` seconds is cut off; one the client keeps taking, however slowly, is not.
- **Connection cap**: past `max_connections` open connections, a new one is answered 503 (with Retry-After, in
  OpenAI's error shape) at once and closed, rather than left to wait. A 503 says "busy, retry" to every HTTP
  client and the SDK retries it, where a dropped connection looks like a network fault. It is written as soon as
  the connection is accepted, without waiting for (or parsing) the request, so a refused connection holds its
  descriptor for at most LINGER_SECONDS (and at most LINGER_BUDGET of them linger), never for the header
  deadline. The default cap is sized from the process's descriptor limit (see `connection_cap`), so connections
  cannot take the descriptors a running batch needs.

The body itself, while a handler waits for it, is watched by api/deadlines.py (`body_idle_timeout`): only the
handler knows when it is waiting for the client rather than busy itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vllm_batch_server.settings import Settings, SettingsError, env_name

log = logging.getLogger(__name__)

# Request line plus headers; a client needing more is broken or hostile (h11's default limit is 16 KiB).
MAX_HEAD_BYTES = 64 * 1024
# How long a refused connection stays open after its 503, so the client reads the answer before the close
# (closing a socket with unread input resets the connection, and a reset can destroy the answer in flight), and
# how many may linger at once: past that, a flood of connections is answered and closed at once, so refusing
# never costs more than LINGER_BUDGET descriptors.
LINGER_SECONDS = 1.0
LINGER_BUDGET = 32
DEFAULT_MAX_CONNECTIONS = 1000
# Descriptors kept out of the connection budget: refused connections lingering (LINGER_BUDGET), the database and
# its journal, the engine, the running batches' inputs and result parts, logs (measured: an idle echo server
# holds 18 and 7 more while a batch runs; a vLLM server running a batch 34-40, its engine core process has its
# own limit).
RESERVED_DESCRIPTORS = 128


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_idle_timeout: float
    keep_alive_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        for name in ("header_timeout", "body_idle_timeout", "keep_alive_timeout", "max_connections"):
            value = getattr(settings, name)
            if value is not None and value <= 0:
                raise SettingsError(f"--{name.replace('_', '-')} ({env_name(name)}) must be positive, got {value}")
        return cls(settings.header_timeout, settings.body_idle_timeout, settings.keep_alive_timeout,
                   connection_cap(settings.max_connections))


def connection_cap(configured: int | None) -> int:
    """The connection cap: as configured, or by default DEFAULT_MAX_CONNECTIONS lowered so that every connection
    can hold two descriptors (its socket and an upload's temporary file) with RESERVED_DESCRIPTORS to spare
    within the process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = DEFAULT_MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(1, (soft - RESERVED_DESCRIPTORS) // 2)
    if configured is not None:
        if configured > room:
            log.warning("--max-connections %d may exhaust the descriptor limit (ulimit -n %d): a batch that then "
                        "cannot open a file pauses until connections close", configured, soft)
        return configured
    if room < DEFAULT_MAX_CONNECTIONS:
        log.info("at most %d connections at once: the process may open %d descriptors (ulimit -n) and each "
                 "connection can take two; raise the limit to allow more", room, soft)
    return min(DEFAULT_MAX_CONNECTIONS, room)


def _error_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    """A whole HTTP response in OpenAI's error shape, written straight to the socket (there is no request for the
    app to answer), with the same `x-should-retry` convention as api/errors.py."""
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    if 400 <= status < 500 and status not in (408, 429):
        extra += "x-should-retry: false\r\n"
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode() + body


class _Refusals:
    """Counts refused connections for the log: one line per interval, not one per connection of a flood."""

    INTERVAL = 10.0

    def __init__(self) -> None:
        self.count = 0
        self.logged_at = -self.INTERVAL

    def note(self, limit: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= self.INTERVAL:
            log.warning("refused %d connection(s) with 503: %d are open, the limit (--max-connections)",
                        self.count, limit)
            self.count, self.logged_at = 0, now


_refusals = _Refusals()
_lingering: set[GuardedHttpProtocol] = set()  # refused connections waiting for their client to read the 503


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus our limits, which every connection's protocol reads."""

    def __init__(self, app: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedHttpProtocol, **kwargs)
        self.limits = limits


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and the cap described above."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, ServerConfig), "GuardedHttpProtocol needs a ServerConfig"
        self.limits = config.limits
        self.timeout_keep_alive = self.limits.keep_alive_timeout  # type: ignore[assignment]  # a float is fine
        self._timer: asyncio.TimerHandle | None = None
        self._timing_head = False  # the timer is the header deadline
        self._stalled_reader: asyncio.TimerHandle | None = None  # the client stopped reading our response
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_bytes = 0
        self._refused = False

    # ---- the connection -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
        else:
            self._arm(self.limits.header_timeout, self._header_timeout, head=True)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after the 503: read and drop
        was_in_head = self._in_head
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head:
            # The first read of a head may carry a body behind it, so only later reads are counted: a head's size
            # is bounded by one read plus MAX_HEAD_BYTES.
            self._head_bytes += len(data) if was_in_head else 0
            if self._head_bytes > MAX_HEAD_BYTES:
                self._close_with(_error_response(
                    431, "Request Header Fields Too Large", f"The request line and headers are larger than "
                    f"{MAX_HEAD_BYTES} bytes.", "headers_too_large"))
        elif self.cycle is not None and self.cycle.response_complete and self.cycle.more_body:
            # Draining the body of a request already answered: bounded by silence, like a body being read.
            self._arm(self.limits.body_idle_timeout, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._reading_resumed()
        _lingering.discard(self)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client is not taking what we send (the transport's buffer is full): it has body_idle_timeout
        seconds to take some of it, or the connection is closed and the response abandoned."""
        super().pause_writing()
        if self._stalled_reader is None:
            # abort, not close: close would wait to flush what the client is not reading, which is forever.
            self._stalled_reader = self.loop.call_later(self.limits.body_idle_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        self._reading_resumed()
        super().resume_writing()

    def _reading_resumed(self) -> None:
        if self._stalled_reader is not None:
            self._stalled_reader.cancel()
            self._stalled_reader = None

    # ---- parser callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if not self._timing_head:  # a new connection's deadline already runs from when it opened
            self._arm(self.limits.header_timeout, self._header_timeout, head=True)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    # ---- timers and refusals --------------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Any, *, head: bool = False) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)
        self._timing_head = head

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timing_head = False

    def _header_timeout(self) -> None:
        self._timer = None
        self._timing_head = False
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._in_head and not answering:
            self._close_with(_error_response(
                408, "Request Timeout", f"The request line and headers did not arrive within "
                f"{self.limits.header_timeout:g} seconds.", "request_timeout"))
        else:
            self.transport.close()  # nothing was asked (or an answer is being written): just close

    def _close_with(self, response: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)  # it serves nothing: it must not count against the cap
        _refusals.note(self.limits.max_connections)
        self.transport.write(_error_response(
            503, "Service Unavailable", f"The server has {self.limits.max_connections} connections open, its "
            "limit; retry in a moment.", "too_many_connections", extra="retry-after: 1\r\n"))
        if len(_lingering) >= LINGER_BUDGET or not self.transport.can_write_eof():
            self.transport.close()
            return
        _lingering.add(self)
        self.transport.write_eof()
        self._arm(LINGER_SECONDS, self.transport.close)
