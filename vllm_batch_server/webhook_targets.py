"""Where webhooks may go: the endpoints the operator configures, and the hosts a batch's own URL may name.

Kept apart from webhooks.py (which delivers) because settings.py needs these types to parse its values, and
must stay free of anything heavy.

An endpoint is written as its URL followed by optional space-separated options (a URL never contains a
space), on the command line once per endpoint:

    --webhook "https://hooks.example.com/batch secret=whsec_... events=batch.completed,batch.failed"

and in the environment as a JSON list of such strings or of objects:

    BATCH_SERVER_WEBHOOKS='[{"url": "https://hooks.example.com/b", "secret": "whsec_...", "events": ["*"]}]'

A batch may name its own receiver in `metadata.webhook_url`, but only on a host the operator allows
(`--webhook-allowed-host`); by default none is, so no one with an API key can make the server send requests
into the operator's network (server-side request forgery).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from vllm_batch_server.statuses import EVENT_TYPES

# What OpenAI sends for batches: the four ways a batch ends. The other lifecycle events (batch.created,
# batch.in_progress, ...) are ours; an endpoint may ask for them by name or with "*".
DEFAULT_EVENTS: tuple[str, ...] = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
ALL_EVENTS = "*"
SECRET_PREFIX = "whsec_"
# Standard Webhooks asks for secrets of 24 to 64 random bytes; fewer than 16 is refused outright.
MIN_SECRET_BYTES = 16

FORMAT = ('expected "URL [secret=whsec_...] [events=batch.completed,...]" or a JSON list of such strings or of '
          '{"url", "secret", "events"} objects')


def check_secret(secret: str, where: str) -> str:
    """A `whsec_` secret as Standard Webhooks (and OpenAI's SDK) read it: base64 after the prefix."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"{where}: a webhook secret starts with {SECRET_PREFIX!r} followed by base64 "
                         "(make one with `vllm-batch-server webhooks new-secret`)")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the webhook secret after {SECRET_PREFIX!r} is not valid base64") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"{where}: the webhook secret is {len(raw)} bytes; use at least {MIN_SECRET_BYTES} "
                         "(24 or more recommended)")
    return secret


def check_url(url: str, where: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: {url[:200]!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError(f"{where}: a webhook URL may not carry credentials; use the signing secret")
    return url


def check_events(events: list[str], where: str) -> tuple[str, ...]:
    if events == [ALL_EVENTS]:
        return EVENT_TYPES
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown or not events:
        raise ValueError(f"{where}: unknown event {(unknown or [''])[0]!r}; expected some of "
                         f"{', '.join(EVENT_TYPES)} (comma-separated) or {ALL_EVENTS!r}")
    return tuple(dict.fromkeys(events))


@dataclass(frozen=True)
class WebhookEndpoint:
    """One receiver from the settings. No secret here means the server-wide `--webhook-secret`."""

    url: str
    secret: str | None = field(default=None, repr=False)  # never in logs or reprs
    events: tuple[str, ...] = DEFAULT_EVENTS

    SETTING_FORMAT = FORMAT

    @classmethod
    def parse_setting(cls, text: str) -> WebhookEndpoint:
        """One endpoint from a flag: `URL [secret=...] [events=a,b]`."""
        url, *options = text.split()
        values: dict[str, str] = {}
        for option in options:
            name, sep, value = option.partition("=")
            if not sep or name not in ("secret", "events") or name in values:
                raise ValueError(f"webhook {url[:200]!r}: unexpected {option[:50]!r}; {FORMAT}")
            values[name] = value
        events = [e for e in values["events"].split(",") if e] if "events" in values else None
        return cls.build(url, values.get("secret"), events)

    @classmethod
    def parse_setting_list(cls, text: str) -> list[WebhookEndpoint]:
        """Endpoints from the environment: a JSON list, or a single endpoint in the flag's form."""
        text = text.strip()
        if not text:
            return []
        if not text.startswith("["):
            return [cls.parse_setting(text)]
        items = json.loads(text)
        if not isinstance(items, list):
            raise ValueError(FORMAT)
        return [cls.from_json(item) for item in items]

    @classmethod
    def from_json(cls, item: Any) -> WebhookEndpoint:
        if isinstance(item, str):
            return cls.parse_setting(item)
        if not isinstance(item, dict) or not isinstance(item.get("url"), str) or set(item) - {
                "url", "secret", "events"}:
            raise ValueError(FORMAT)
        events = item.get("events")
        if events is not None and not (isinstance(events, list) and all(isinstance(e, str) for e in events)):
            raise ValueError(f"webhook {item['url'][:200]!r}: events must be a list of event names")
        secret = item.get("secret")
        if secret is not None and not isinstance(secret, str):
            raise ValueError(f"webhook {item['url'][:200]!r}: secret must be a string")
        return cls.build(item["url"], secret, events)

    @classmethod
    def build(cls, url: str, secret: str | None, events: list[str] | None) -> WebhookEndpoint:
        where = f"webhook {url[:200]!r}"
        check_url(url, where)
        if secret is not None:
            check_secret(secret, where)
        return cls(url, secret, DEFAULT_EVENTS if events is None else check_events(events, where))

    def as_setting(self) -> dict[str, Any]:
        """The JSON object form, for writing an environment file."""
        found: dict[str, Any] = {"url": self.url}
        if self.secret is not None:
            found["secret"] = self.secret
        if self.events != DEFAULT_EVENTS:
            found["events"] = list(self.events)
        return found


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether a batch's `metadata.webhook_url` names a host the operator allows. An entry is a host name or
    address (any port), `host:port` (that port only), or `*.example.com` (its subdomains, any port)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return False
    if not host or parts.scheme not in ("http", "https"):
        return False
    port = port or (443 if parts.scheme == "https" else 80)
    for entry in allowed:
        entry = entry.strip().lower()
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
            continue
        name, entry_port = _split_host_port(entry)
        if host == name and (not entry_port or (entry_port.isdigit() and port == int(entry_port))):
            return True
    return False


def _split_host_port(entry: str) -> tuple[str, str]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port or "")."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""
