"""Where batches go, what that backend allows, and which key goes with it.

A key belongs to one origin (scheme, host, port). It is only read from the environment variable configured
for that origin and only sent there: `BATCH_API_KEY` goes with `BATCH_BASE_URL` (or the local default when
that is unset), `OPENAI_API_KEY` with api.openai.com, `PARASAIL_API_KEY` with api.parasail.io. A URL that
matches none of them gets no key unless one is passed explicitly. The openai SDK's own environment fallbacks
(`OPENAI_API_KEY`, `OPENAI_ORG_ID`, `OPENAI_PROJECT_ID`, `OPENAI_CUSTOM_HEADERS`, `OPENAI_BASE_URL`) are
switched off through the SDK's public options: explicit constructor arguments (`make_openai_kwargs`) and
headers omitted on every request (`request_headers`), so nothing else rides along either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import openai

from vllm_batch._errors import ConfigurationError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# vLLM's scoring endpoints: our server and `vllm run-batch` take them; OpenAI's Batch API does not.
VLLM_ENDPOINTS = ("/v1/score", "/v1/rerank")

MB = 1_000_000
LOCAL_BASE_URL = "http://localhost:4080/v1"


@dataclass(frozen=True)
class Provider:
    """A Batch API backend and its rules.

    `max_requests` and `max_bytes` are per input file (one batch); past them the client shards. When
    `mixed_models` is false every request of a batch must name the same model. `base64_embeddings` says the
    backend accepts `encoding_format="base64"` for embeddings, which the client then asks for by default.
    """

    name: str
    base_url: str
    api_key_env: str | None = None
    max_requests: int = 50_000
    max_bytes: int = 200 * MB
    mixed_models: bool = False
    base64_embeddings: bool = True
    endpoints: tuple[str, ...] = ENDPOINTS
    completion_window: str = "24h"
    # Headers that only make sense for this provider (e.g. OpenAI organization); sent to its host only.
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return origin_of(self.base_url)

    def with_limits(self, *, max_requests: int | None = None, max_bytes: int | None = None) -> Provider:
        for name, value in (("max_requests", max_requests), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name} must be a positive whole number, got {value!r}")
        return replace(
            self,
            max_requests=self.max_requests if max_requests is None else max_requests,
            max_bytes=self.max_bytes if max_bytes is None else max_bytes,
        )


PRESETS: dict[str, Provider] = {
    # Our server: its defaults are 50,000 lines and 512 MiB per file; one model per batch keeps the
    # scheduler from switching models inside a batch.
    "local": Provider(
        "local",
        LOCAL_BASE_URL,
        "BATCH_API_KEY",
        50_000,
        512 * 1024 * 1024,
        mixed_models=False,
        base64_embeddings=True,
        endpoints=(*ENDPOINTS, *VLLM_ENDPOINTS),
    ),
    "openai": Provider(
        "openai",
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
        50_000,
        200 * MB,
        mixed_models=False,
        base64_embeddings=True,
    ),
    # Parasail accepts several models in one file. Whether its batch embeddings honour base64 is not
    # documented, so floats are asked for (bigger files, never wrong).
    "parasail": Provider(
        "parasail",
        "https://api.parasail.io/v1",
        "PARASAIL_API_KEY",
        50_000,
        500 * MB,
        mixed_models=True,
        base64_embeddings=False,
        endpoints=("/v1/chat/completions", "/v1/completions", "/v1/embeddings"),
    ),
}


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    # localhost and 127.0.0.1 are the same machine, but still treated as different origins: a key is tied
    # to what the user wrote, nothing cleverer.
    return f"{parts.scheme}://{host}:{port}"


@dataclass(frozen=True)
class ResolvedProvider:
    provider: Provider
    api_key: str | None
    # The caller's own limits, kept so they still win if the provider is recognised later (`as_batch_server`).
    max_requests: int | None = None
    max_bytes: int | None = None


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value.strip() or None if value is not None else None


def resolve_provider(
    provider: str | Provider | None = None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    max_requests: int | None = None,
    max_bytes: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedProvider:
    """Pick the backend and its key.

    Order: an explicit `provider` (preset name or `Provider`), else an explicit `base_url`, else
    `BATCH_PROVIDER`, else `BATCH_BASE_URL`, else `local`. A base URL on a preset's origin inherits that
    preset's limits. An explicit `api_key` is used as given; otherwise only the variable tied to the
    chosen origin is read (see the module docstring).
    """
    env = os.environ if environ is None else environ
    env_base = _env(env, "BATCH_BASE_URL")
    if provider is not None and base_url is not None:
        raise ConfigurationError("pass either provider= or base_url=, not both")

    chosen: Provider
    if isinstance(provider, Provider):
        chosen = provider
    elif isinstance(provider, str):
        chosen = _preset(provider)
    elif base_url is not None:
        chosen = _for_url(base_url)
    elif (name := _env(env, "BATCH_PROVIDER")) is not None:
        chosen = _preset(name)
    elif env_base is not None:
        chosen = _for_url(env_base)
    else:
        chosen = PRESETS["local"]
    chosen = chosen.with_limits(max_requests=max_requests, max_bytes=max_bytes)

    key = api_key if api_key is not None else key_for_origin(chosen, env)
    if key is None and chosen.name in ("openai", "parasail"):
        raise ConfigurationError(
            f"no API key for {chosen.name}: set {chosen.api_key_env}, or give the key explicitly "
            "(keys of other providers are never used for it)"
        )
    return ResolvedProvider(chosen, key, max_requests, max_bytes)


def is_batch_server(health: Any) -> bool:
    """Whether a `/health` answer comes from a vllm-batch-server (it names its engine and loaded model)."""
    return isinstance(health, dict) and health.get("status") == "ok" and "engine" in health and (
        "loaded_model" in health
    )


def as_batch_server(resolved: ResolvedProvider) -> ResolvedProvider:
    """A custom URL that turned out to be a vllm-batch-server: the local preset's limits and endpoints there."""
    server = replace(PRESETS["local"], base_url=resolved.provider.base_url)
    server = server.with_limits(max_requests=resolved.max_requests, max_bytes=resolved.max_bytes)
    return replace(resolved, provider=server)


def key_for_origin(provider: Provider, environ: Mapping[str, str]) -> str | None:
    """The environment key that belongs to `provider`'s origin, or None."""
    origin = provider.origin
    env_base = _env(environ, "BATCH_BASE_URL")
    # BATCH_API_KEY belongs to BATCH_BASE_URL, or to the local default when that is unset.
    batch_origin = origin_of(env_base) if env_base else origin_of(LOCAL_BASE_URL)
    if origin == batch_origin and (key := _env(environ, "BATCH_API_KEY")):
        return key
    for preset in PRESETS.values():
        if preset.api_key_env and preset.api_key_env != "BATCH_API_KEY" and preset.origin == origin:
            return _env(environ, preset.api_key_env)
    if provider.api_key_env and provider.api_key_env != "BATCH_API_KEY" and provider.name not in PRESETS:
        # A custom Provider naming its own variable: the user tied that variable to this URL.
        return _env(environ, provider.api_key_env)
    return None


def _preset(name: str) -> Provider:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigurationError(f"unknown provider {name!r}; known: {', '.join(PRESETS)}") from None


def _for_url(url: str) -> Provider:
    origin = origin_of(url)
    for preset in PRESETS.values():
        if preset.origin == origin and preset.name != "local":
            return replace(preset, base_url=url.rstrip("/"))
    local = PRESETS["local"]
    if origin == local.origin:
        return replace(local, base_url=url.rstrip("/"))
    # Any other URL: our server elsewhere or another OpenAI-compatible service. OpenAI's limits (the
    # safest common ground) and every endpoint; the server itself refuses what it does not offer.
    return replace(local, name="custom", base_url=url.rstrip("/"), endpoints=(*ENDPOINTS, *VLLM_ENDPOINTS),
                   max_bytes=200 * MB)


def make_openai_kwargs(resolved: ResolvedProvider, *, timeout: Any) -> dict[str, Any]:
    """Arguments for `openai.OpenAI` / `openai.AsyncOpenAI` that leave it no room to read the environment."""
    return {
        "base_url": resolved.provider.base_url,
        # "" rather than None: None makes the SDK fall back to OPENAI_API_KEY, which belongs to another host.
        # An empty key sends no Authorization header at all.
        "api_key": resolved.api_key or "",
        "admin_api_key": "",
        "max_retries": 0,  # ours are the only retries (see _retry.py)
        "timeout": timeout,
        "default_headers": dict(resolved.provider.extra_headers),
    }


def request_headers(
    resolved: ResolvedProvider, environ: Mapping[str, str] | None = None
) -> dict[str, str | openai.Omit]:
    """Headers for every request: removes what the SDK picked up from OPENAI_* variables that are not tied
    to this host (`openai.Omit` drops a header), and lets it talk without a key where none is set."""
    env = os.environ if environ is None else environ
    own = {name.lower() for name in resolved.provider.extra_headers}
    headers: dict[str, str | openai.Omit] = {}
    # OPENAI_CUSTOM_HEADERS is merged into the SDK's default headers at construction: drop all but ours.
    for entry in (env.get("OPENAI_CUSTOM_HEADERS") or "").split("\n"):
        name = entry.partition(":")[0].strip()
        if ":" in entry and name and name.lower() not in own:
            headers[name] = openai.Omit()
    if resolved.provider.origin != PRESETS["openai"].origin:
        # Organization and project identify an OpenAI account: only ever sent to OpenAI's host.
        headers["OpenAI-Organization"] = openai.Omit()
        headers["OpenAI-Project"] = openai.Omit()
    if not resolved.api_key:
        # No key: send no Authorization header at all (the SDK asks for this to be said explicitly).
        headers["Authorization"] = openai.Omit()
    return headers


def health_url(base_url: str) -> str:
    """Where a vllm-batch-server answers `/health`: beside its `/v1`."""
    root = base_url.rstrip("/")
    return (root[: -len("/v1")] if root.endswith("/v1") else root) + "/health"


def with_idempotency_key(headers: dict[str, str | openai.Omit], key: str | None) -> dict[str, str | openai.Omit]:
    return {**headers, "Idempotency-Key": key} if key else headers
