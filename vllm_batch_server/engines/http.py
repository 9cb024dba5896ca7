"""A server that speaks the OpenAI API, as an engine: `vllm serve`, SGLang, Ray Serve LLM, an llm-d gateway, or
another vllm-batch server's online endpoints.

One `HttpEngine` is one backend (`--backend URL[,key=env:VAR][,window=N][,name=LABEL]`). It posts a batch line's
body as it is to the backend's endpoint and hands back the backend's answer as it is: the body of a 200 goes to
the output file, a 4xx that is the request's fault goes to the error file. Everything that is the backend's
fault rather than the request's (it is unreachable, overloaded, timing out, erroring) is raised as a
`BackendError` saying how the router should treat it; the router (router.py) then tries another backend.

Keys: a backend's key is read from an environment variable or a file (never from the command line, where
`ps` shows it), sent only to that backend's own host (its client has that base URL and follows no redirects),
and never logged: a spec prints as its URL and where its key comes from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from vllm_batch_server.engines.base import EngineError, Result, Usage, is_answer
from vllm_batch_server.engines.inflight import InFlight
from vllm_batch_server.settings import Settings

log = logging.getLogger(__name__)

# How long connecting to a backend may take: a host that does not accept a connection within this is down.
CONNECT_SECONDS = 10.0


class BackendSpecError(ValueError):
    """A `--backend` value cannot be used; the message names it."""


@dataclass(frozen=True)
class BackendSpec:
    url: str  # the base URL as an OpenAI client takes it, e.g. http://host:8000/v1 (no trailing slash)
    name: str
    window: int
    key_source: str | None = None  # "env:NAME" or "file:PATH": where the key comes from, safe to print
    key: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name if self.name == self.url else f"{self.name} ({self.url})"


def parse_backends(values: list[str], default_window: int) -> list[BackendSpec]:
    """`--backend` values (or BATCH_SERVER_BACKENDS split at its commas) as specs.

    A value is `URL[,key=env:VAR|file:PATH][,window=N][,name=LABEL]`. Every item is joined back and split at
    commas again, and each item holding `://` starts a new backend, so a flag given per backend and one
    comma-separated environment variable for all of them read the same.
    """
    groups: list[list[str]] = []
    for item in ",".join(values).split(","):
        item = item.strip()
        if not item:
            continue
        if "://" in item:
            groups.append([item])
        elif "=" not in item:
            raise BackendSpecError(f"--backend {item!r}: expected an http:// or https:// URL such as "
                                   "http://gpu-1:8000/v1")
        elif not groups:
            raise BackendSpecError(f"--backend: {item!r} comes before any URL; write URL,{item}")
        else:
            groups[-1].append(item)
    specs = [_parse_one(group, default_window) for group in groups]
    seen: set[str] = set()
    for spec in specs:
        if spec.url in seen:
            raise BackendSpecError(f"--backend {spec.url} is given twice")
        seen.add(spec.url)
    return specs


def _parse_one(items: list[str], default_window: int) -> BackendSpec:
    url = items[0].rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendSpecError(f"--backend {items[0]!r}: expected an http:// or https:// URL such as "
                               "http://gpu-1:8000/v1")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BackendSpecError(f"--backend {url}: write the base URL only (no query, fragment or credentials; "
                               "give a key with key=env:NAME)")
    if parts.path in ("", "/"):
        url += "/v1"  # what every OpenAI-compatible server serves under
    window, name, key, key_source = default_window, url, None, None
    for option in items[1:]:
        option_name, sep, value = option.partition("=")
        if not sep or not value:
            raise BackendSpecError(f"--backend {url}: expected key=..., window=N or name=LABEL, got {option!r}")
        if option_name == "window":
            try:
                window = int(value)
            except ValueError:
                window = 0
            if window < 1:
                raise BackendSpecError(f"--backend {url}: window must be a whole number of requests >= 1, "
                                       f"got {value!r}")
        elif option_name == "name":
            name = value
        elif option_name == "key":
            key_source, key = value, _read_key(url, value)
        else:
            raise BackendSpecError(f"--backend {url}: unknown option {option_name!r}; expected key, window or "
                                   "name")
    return BackendSpec(url=url, name=name, window=window, key_source=key_source, key=key)


def _read_key(url: str, source: str) -> str:
    kind, _, where = source.partition(":")
    if kind == "env" and where:
        key = os.environ.get(where, "").strip()
        if not key:
            raise BackendSpecError(f"--backend {url}: key=env:{where}, but the environment variable {where} is "
                                   "not set or empty")
        return key
    if kind == "file" and where:
        try:
            key = Path(where).expanduser().read_text().strip()
        except OSError as exc:
            raise BackendSpecError(f"--backend {url}: key=file:{where} cannot be read ({exc.strerror})") from None
        if not key:
            raise BackendSpecError(f"--backend {url}: key=file:{where} is empty")
        return key
    # A literal key would sit in the process list and shell history: refuse it rather than leak it.
    raise BackendSpecError(f"--backend {url}: give the key as key=env:VARIABLE or key=file:PATH (a key written "
                           "on the command line is visible to every user of the machine)")


class BackendError(EngineError):
    """One attempt on a backend failed for a reason that is not (or not surely) the request's fault.

    `down`: the backend is unreachable or refuses us; take it out of rotation now. `busy`: it works but asks us
    to slow down (429, 408): a smaller window and a pause, nothing more. `charge`: the failure may be the
    request's own (a 500, a timeout), so it counts against the request's few attempts, after which the request
    gets `result` as its answer; an uncharged failure (overload, a dead backend) never fails a request.
    `retry_after`: the backend asked for a pause (Retry-After). `bad_answer`: it answered 200 with something
    that is no answer of the endpoint (not JSON, an error object, the wrong shape): charged, and counted
    against the backend apart from its other failures, so one that keeps doing it is taken out.
    """

    def __init__(self, message: str, *, down: bool = False, busy: bool = False, charge: bool = False,
                 retry_after: float | None = None, result: Result | None = None, bad_answer: bool = False) -> None:
        super().__init__(message)
        self.down = down
        self.busy = busy
        self.charge = charge or bad_answer
        self.bad_answer = bad_answer
        self.retry_after = retry_after
        self.result = result or Result.error(502, message, type="server_error", code="backend_error")


class ModelNotServed(EngineError):
    """The backend answers, but does not serve the model asked for."""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from model servers; the router's own back-off applies


def _parsed(response: httpx.Response) -> Any:
    """The response's JSON, or None when it is not JSON. NaN and Infinity, which are not JSON but which Python's
    json writes, are read as null, so that what is written out parses everywhere (a usage count of NaN is then
    an odd one, counted as 0)."""
    try:
        return json.loads(response.content, parse_constant=_null)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _null(name: str) -> None:
    return None


def _body(response: httpx.Response, parsed: Any = None) -> dict[str, Any]:
    """The backend's answer as it is when it is a JSON object; otherwise an OpenAI error object quoting it."""
    body = _parsed(response) if parsed is None else parsed
    if isinstance(body, dict):
        return body
    text = response.text[:1000] if response.content else response.reason_phrase
    kind = "server_error" if response.status_code >= 500 else "invalid_request_error"
    return {"error": {"message": f"backend answered {response.status_code}: {text}", "type": kind,
                      "param": None, "code": None}}


class HttpEngine:
    """One OpenAI-compatible backend. `start(model)` checks that the backend serves the model (/v1/models)."""

    kind = "http"

    def __init__(self, spec: BackendSpec, settings: Settings) -> None:
        self.spec = spec
        self.name = spec.name
        self._timeout = settings.backend_timeout
        self._probe_seconds = settings.backend_probe_seconds
        self._model: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._inflight = InFlight()
        self.models: list[str] | None = None  # what /v1/models listed last time it answered
        self.models_checked_at = 0.0  # time.monotonic()

    # ------------------------------------------------------------------------------------------ protocol

    @property
    def capacity(self) -> int:
        return self.spec.window

    @property
    def model(self) -> str | None:
        return self._model

    async def start(self, model: str) -> None:
        served = await self.list_models()
        if model not in served:
            raise ModelNotServed(f"backend {self.spec} does not serve model {model!r}; its /v1/models lists "
                                 f"{', '.join(served) or 'nothing'}")
        self._model = model

    async def stop(self) -> None:
        await self._inflight.end_all()
        self._model = None
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        # `priority` orders requests in the router; it is not sent: OpenAI's API has no such field, and vLLM
        # refuses it unless started with --scheduling-policy priority.
        if self._model is None:
            raise EngineError(f"backend {self.spec}: no model is started")
        if body.get("stream"):
            return Result.error(400, "stream is not supported in a batch; results are written to the output file",
                                param="stream")
        return await self._inflight.run(request_id, self._post(request_id, url, body))

    async def abort(self, request_ids: list[str]) -> None:
        # Cancelling the request closes its connection; vLLM and SGLang abort a request whose client went away.
        self._inflight.abort(request_ids)

    async def check_health(self) -> None:
        served = await self.list_models()
        if self._model is not None and self._model not in served:
            raise ModelNotServed(f"backend {self.spec} no longer serves model {self._model!r}")

    # ------------------------------------------------------------------------------------------ HTTP

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.spec.key}"} if self.spec.key else {}
            self._client = httpx.AsyncClient(
                base_url=self.spec.url, headers=headers,
                # No redirects (a redirect could carry the key to another host) and no proxies or .netrc from
                # the environment: requests go exactly to the URL given.
                follow_redirects=False, trust_env=False,
                timeout=httpx.Timeout(None, connect=CONNECT_SECONDS),
                limits=httpx.Limits(max_connections=self.spec.window + 2,
                                    max_keepalive_connections=self.spec.window + 2),
            )
        return self._client

    async def list_models(self) -> list[str]:
        """The model ids of the backend's /v1/models. Raises BackendError when it does not answer in time."""
        try:
            response = await asyncio.wait_for(self._http().get("/models"), self._probe_seconds)
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            raise BackendError(f"backend {self.spec}: /v1/models did not answer ({_describe(exc)})",
                               down=True) from None
        if response.status_code != 200:
            hint = " (check its key)" if response.status_code in (401, 403) else ""
            raise BackendError(f"backend {self.spec}: /v1/models answered {response.status_code}{hint}", down=True)
        try:
            data = response.json().get("data")
            served = [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
        except (ValueError, AttributeError, TypeError):
            raise BackendError(f"backend {self.spec}: /v1/models is not an OpenAI model list", down=True) from None
        self.models, self.models_checked_at = served, time.monotonic()
        return served

    async def _post(self, request_id: str, url: str, body: dict[str, Any]) -> Result:
        response = await self._send(request_id, url, body, stream=False)
        return self._answer(response, url)

    async def stream(self, request_id: str, url: str, body: dict[str, Any], *,
                     priority: int = 0) -> Result | AsyncIterator[bytes]:
        """An online request with `"stream": true`: the backend's server-sent events as they come, byte for
        byte. A failure before the first event is a Result or a BackendError as for `run`; after it, the
        stream just ends (what was sent cannot be taken back, so it is not tried elsewhere)."""
        if self._model is None:
            raise EngineError(f"backend {self.spec}: no model is started")
        response = await self._send(request_id, url, body, stream=True)
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            return self._answer(response, url)
        return self._relay(response)

    @staticmethod
    async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for piece in response.aiter_raw():
                yield piece
        finally:
            await response.aclose()  # early: closes the connection, and the backend aborts the request

    async def _send(self, request_id: str, url: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        """The backend's response (its headers, and its body unless streaming), or a BackendError."""
        client = self._http()
        path = url[len("/v1"):] if url.startswith("/v1/") else url
        # Sent as-is; the id ties the backend's logs (vLLM's --enable-request-id-headers) to the batch line.
        request = client.build_request("POST", path, json=body, headers={"X-Request-Id": request_id})
        try:
            return await asyncio.wait_for(client.send(request, stream=stream), self._timeout)
        except asyncio.TimeoutError:
            raise BackendError(f"backend {self.spec}: no answer within {self._timeout:g}s", charge=True,
                               result=Result.error(504, f"The request got no answer within {self._timeout:g}s "
                                                   "on any backend tried.", type="server_error",
                                                   code="backend_timeout")) from None
        except httpx.HTTPError as exc:
            # Refused, reset, closed mid-answer: the backend (or the way to it) is gone.
            raise BackendError(f"backend {self.spec}: {_describe(exc)}", down=True) from None

    def _answer(self, response: httpx.Response, url: str) -> Result:
        """What a (read) response means: a Result for the request, or a BackendError (see the class)."""
        status = response.status_code
        parsed = _parsed(response)
        if status == 200:
            if not is_answer(url, parsed):
                # Only an answer of the endpoint is a success: anything else is the backend's fault, never
                # committed as a 200 (a proxy's error page, an error object, a truncated or foreign body).
                what = "no JSON" if parsed is None else f"JSON that is no {url} answer"
                message = f"backend {self.spec}: answered 200 with {what}"
                raise BackendError(message, bad_answer=True, result=Result.error(
                    502, f"The backends tried answered {url} with something that is not an answer of it "
                    f"(the last: 200 with {what}).", type="server_error", code="bad_backend_response"))
            return Result(200, parsed, Usage.from_body(parsed))
        answer = _body(response, parsed)
        if 300 <= status < 400:
            raise BackendError(f"backend {self.spec}: redirected ({status}) to "
                               f"{response.headers.get('location')!r}; give its final URL", down=True)
        if status in (401, 403):
            raise BackendError(f"backend {self.spec}: refused our key ({status})", down=True)
        if status in (408, 429):
            # Busy or rate-limited: it works, just not faster. Wait as asked; never the request's fault.
            raise BackendError(f"backend {self.spec}: answered {status}", busy=True,
                               retry_after=_retry_after(response) or 1.0, result=Result(status, answer))
        code = answer.get("error", {}).get("code") if isinstance(answer.get("error"), dict) else None
        if status == 503 and code in ("model_not_loaded", "model_loading"):
            # Another vllm-batch server on its way to serving the model (loading it, or after its batches): a
            # wait, as for a rate limit, neither the request's fault nor the backend's (docs/scale.md).
            raise BackendError(f"backend {self.spec}: is loading {self._model} ({code})", busy=True,
                               retry_after=_retry_after(response) or 1.0, result=Result(status, answer))
        if status == 400 and code == "model_not_loaded":
            # A vllm-batch server that will not serve the model now (kept on another with --online-model): not
            # the request's fault; out of rotation until a health check finds it serving (or the others do).
            raise BackendError(f"backend {self.spec}: does not serve {self._model} now (model_not_loaded)",
                               down=True, result=Result(status, answer))
        if status in (502, 503, 504):
            # Restarting, or a gateway without a healthy upstream: not this request's fault either.
            raise BackendError(f"backend {self.spec}: answered {status}", retry_after=_retry_after(response),
                               result=Result(status, answer))
        if status == 404 or status >= 500:
            # A 404 here is the backend's (our validation knows the model and endpoint); a 500 may be either.
            raise BackendError(f"backend {self.spec}: answered {status}", charge=True, result=Result(status, answer))
        return Result(status, answer)  # the request's own fault (400, 413, 422, ...): its error line


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
