"""Webhooks: batch events delivered to HTTP receivers as OpenAI sends them, signed per Standard Webhooks.

    event log ──"webhooks" reader──▶ webhook_deliveries (SQLite) ──sender──▶ POST to each receiver

Two steps, each durable:

1. The reader takes events from the lifecycle's log (its own cursor, events.py), decides who gets each one
   (the configured endpoints whose filter names it, and the batch's `metadata.webhook_url` if its host is
   allowed) and records one delivery per receiver before it acks the events. A crash before the ack reads the
   events again; the deliveries table keeps one row per (event, URL), so nothing is recorded twice.
2. The sender posts every due delivery, a bounded number at a time and at most a few per receiver, so a dead
   or slow receiver holds up neither the others nor, ever, a batch: nothing in the queue waits for it. The
   operator's endpoints (`--webhook`) and the batches' own URLs have a budget each, so per-batch URLs never
   starve the operator's; per-batch URLs share their per-receiver limit by host (scheme, host and port), not
   by URL, so a hundred URLs on one host are one receiver. `--webhook-timeout` bounds a whole attempt
   (connecting, the answer's head, its body), so a receiver that answers a byte a second is cut off. A
   failed attempt is retried with exponential back-off until `--webhook-retry-for` has passed since the
   event. Every attempt carries the delivery's id as `webhook-id`, so a receiver can drop repeats: delivery
   is at least once (a kill -9 after a receiver answered, before the answer was recorded, sends it again).

The body is OpenAI's event object, `{"id": "evt_…", "object": "event", "type": "batch.completed",
"created_at": …, "data": {"id": "batch_…"}}`, and the signature is made by the `standardwebhooks` library,
which the official `openai` SDK's `client.webhooks.unwrap()` verifies. Secrets stay in the settings; the
database holds only what was sent and how each attempt went (GET /v1/batches/{id}/webhooks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from vllm_batch_server import __version__
from vllm_batch_server.aio import wait_event
from vllm_batch_server.observers.metrics import Metrics
from vllm_batch_server.settings import Settings, SettingsError
from vllm_batch_server.store.database import Database
from vllm_batch_server.store.events import EventLog
from vllm_batch_server.store.lifecycle import Event
from vllm_batch_server.webhook_targets import DEFAULT_EVENTS, check_url, host_allowed

log = logging.getLogger(__name__)

READER = "webhooks"
METADATA_KEY = "webhook_url"
MAX_IN_FLIGHT = 16  # deliveries being attempted at once, for each source (the operator's, the batches')
PER_RECEIVER = 2  # ... of which at most this many to one receiver (see `receiver_key`)
MAX_BACKOFF = 3600.0
IDLE_POLL = 5.0  # the longest the sender sleeps without looking at the table
FROM_SETTINGS, FROM_METADATA = "settings", "metadata"


def check_settings(settings: Settings) -> None:
    """Refuse, at start-up, webhook settings that could not sign or send anything."""
    for endpoint in settings.webhooks:
        if endpoint.secret is None and settings.webhook_secret is None:
            raise SettingsError(f"webhook {endpoint.url!r} has no secret: add secret=whsec_... to it, or set "
                                "--webhook-secret (BATCH_SERVER_WEBHOOK_SECRET)")
    if settings.webhook_allowed_hosts and settings.webhook_secret is None:
        raise SettingsError("--webhook-allowed-host lets batches name their own webhook_url, which is signed with "
                            "--webhook-secret (BATCH_SERVER_WEBHOOK_SECRET): set it")
    if settings.webhook_secret is not None:
        from vllm_batch_server.webhook_targets import check_secret

        try:
            check_secret(settings.webhook_secret, "--webhook-secret")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None


def check_batch_url(url: str, settings: Settings) -> str | None:
    """Why a batch may not name `url` as its webhook (None: it may)."""
    if not settings.webhook_allowed_hosts:
        return ("this server sends webhooks only to the endpoints its operator configured (no host is allowed "
                "for metadata.webhook_url)")
    try:
        check_url(url, "metadata.webhook_url")
    except ValueError as exc:
        return str(exc)
    if not host_allowed(url, settings.webhook_allowed_hosts):
        return f"the host of {url[:200]!r} is not one this server's operator allows for webhooks"
    return None


def receiver_key(url: str, source: str) -> str:
    """What the per-receiver limit counts by: an operator's endpoint by its URL; a batch's URL by its host (scheme,
    host and port), so that many per-batch URLs on one host, differing in path or query, are one receiver."""
    if source == FROM_SETTINGS:
        return url
    try:
        parts = urlsplit(url)
        return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        return url


def payload(event: Event) -> str:
    """OpenAI's event object, serialized once: the signed bytes are exactly the stored ones on every attempt."""
    return json.dumps({"id": event.id, "object": "event", "type": event.type, "created_at": event.created_at,
                       "data": {"id": event.batch_id}}, separators=(",", ":"))


def shown_url(url: str) -> str:
    """A URL without its query or fragment (which may hold a token) for the API and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def delivery_object(row: Any) -> dict[str, Any]:
    """A delivery as GET /v1/batches/{id}/webhooks shows it (our extension; see docs/operations.md)."""
    next_at = row["next_attempt_at"]
    return {
        "object": "batch.webhook_delivery",
        "id": row["id"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "url": shown_url(row["url"]),
        "source": row["source"],
        "status": row["status"],
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "last_attempt_at": row["last_attempt_at"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "next_attempt_at": int(next_at) if next_at is not None and row["status"] == "pending" else None,
        "delivered_at": row["delivered_at"],
    }


class Webhooks:
    def __init__(self, db: Database, events: EventLog, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics()  # the app's; a test's own otherwise
        self._db = db
        self._settings = settings
        self._reader = events.reader(READER, start="end")
        self._wake = asyncio.Event()  # new deliveries, or a free slot
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._per_source: Counter[str] = Counter()
        self._per_receiver: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._settings.webhooks or self._settings.webhook_allowed_hosts)

    async def start(self) -> None:
        await self._reader.position()  # placed now, before the scheduler ends any batch
        # Never follows redirects: a receiver could otherwise point the server at any host.
        self._client = httpx.AsyncClient(timeout=self._settings.webhook_timeout, follow_redirects=False,
                                         headers={"user-agent": f"vllm-batch/{__version__}"}, trust_env=False)
        self._tasks = [asyncio.create_task(self._follow_log(), name="webhooks: event log"),
                       asyncio.create_task(self._send_loop(), name="webhooks: sender")]

    async def stop(self) -> None:
        """Attempts under way are abandoned unrecorded: they are made again, with the same webhook-id, at the
        next start."""
        tasks = [*self._tasks, *self._in_flight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # ---- step 1: events → deliveries --------------------------------------------------------------------

    async def _follow_log(self) -> None:
        while True:
            try:
                events = await self._reader.next(timeout=30)
                if events:
                    await self.record(events)
                    await self._reader.ack(events[-1])
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk, say: the cursor has not moved, so nothing is lost
                log.exception("webhooks: could not record deliveries; retrying in 5 s")
                await asyncio.sleep(5)

    async def record(self, events: list[Event]) -> int:
        """Record the deliveries these events call for; how many."""
        settings = self._settings
        rows: list[dict[str, Any]] = []
        for event in events:
            targets = {e.url: FROM_SETTINGS for e in settings.webhooks if event.type in e.events}
            if settings.webhook_allowed_hosts and event.type in DEFAULT_EVENTS:
                batch = await self._db.get_batch(event.batch_id)
                url = (batch.metadata or {}).get(METADATA_KEY) if batch is not None else None
                if url and url not in targets:
                    refusal = check_batch_url(url, settings)
                    if refusal is None:
                        targets[url] = FROM_METADATA
                    else:  # allowed when the batch was created, no longer (the settings changed)
                        log.warning("webhooks: not sending %s of batch %s: %s", event.type, event.batch_id,
                                    refusal)
            body = payload(event)
            for url, source in targets.items():
                rows.append({"id": "wh_" + secrets.token_hex(16), "event_id": event.id, "event_type": event.type,
                             "batch_id": event.batch_id, "url": url, "source": source, "payload": body,
                             "status": "pending", "created_at": event.created_at, "next_attempt_at": time.time()})
        await self._db.add_deliveries(rows)
        if rows:
            self._wake.set()
        return len(rows)

    # ---- step 2: deliveries → receivers -----------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            self._wake.clear()  # before looking, so a delivery recorded meanwhile wakes us again
            timeout = IDLE_POLL
            try:
                blocked = False
                for source in (FROM_SETTINGS, FROM_METADATA):  # each its own budget: neither starves the other
                    if self._per_source[source] >= MAX_IN_FLIGHT:
                        blocked = True
                        continue
                    due = await self._db.due_deliveries(time.time(), MAX_IN_FLIGHT * 16, self._in_flight, source)
                    for row in due:
                        key = receiver_key(row["url"], source)
                        if self._per_source[source] >= MAX_IN_FLIGHT or self._per_receiver[key] >= PER_RECEIVER:
                            blocked = True
                            continue
                        self._begin(row)
                if not blocked:
                    upcoming = await self._db.next_delivery_at(self._in_flight)
                    if upcoming is not None:
                        timeout = min(IDLE_POLL, max(0.01, upcoming - time.time()))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhooks: could not read the deliveries; retrying in %.0f s", IDLE_POLL)
            await wait_event(self._wake, timeout)

    def _begin(self, row: Any) -> None:
        delivery_id, source = row["id"], row["source"]
        key = receiver_key(row["url"], source)
        task = asyncio.create_task(self._attempt(row), name=f"webhook {delivery_id}")
        self._in_flight[delivery_id] = task
        self._per_source[source] += 1
        self._per_receiver[key] += 1

        def done(_: asyncio.Task[None]) -> None:
            self._in_flight.pop(delivery_id, None)
            for counter, name in ((self._per_source, source), (self._per_receiver, key)):
                counter[name] -= 1
                if counter[name] <= 0:
                    del counter[name]
            self._wake.set()

        task.add_done_callback(done)

    def _secret_for(self, row: Any) -> str | None:
        if row["source"] == FROM_SETTINGS:
            endpoint = next((e for e in self._settings.webhooks if e.url == row["url"]), None)
            if endpoint is None:
                return None  # removed from the settings since
            return endpoint.secret or self._settings.webhook_secret
        if check_batch_url(row["url"], self._settings) is not None:
            return None
        return self._settings.webhook_secret

    async def _attempt(self, row: Any) -> None:
        try:
            await self._attempt_once(row)
        except asyncio.CancelledError:
            raise
        except Exception:  # recording the attempt failed (a full disk): it stays due and is tried again
            log.exception("webhooks: could not record an attempt of %s", row["id"])
            await asyncio.sleep(IDLE_POLL)

    async def _attempt_once(self, row: Any) -> None:
        secret = self._secret_for(row)
        now = int(time.time())
        if secret is None:
            await self._db.update_delivery(row["id"], attempted=False, status="failed", next_attempt_at=None,
                                           last_error="the receiver is no longer configured or allowed")
            self._metrics.webhook_deliveries.labels("failed").inc()
            return
        status_code, error = await self._post(row, secret)
        ok = status_code is not None and 200 <= status_code < 300
        self._metrics.webhook_attempts.labels("success" if ok else "failure").inc()
        if ok:
            await self._db.update_delivery(row["id"], attempted=True, status="delivered", delivered_at=now,
                                           last_attempt_at=now, last_status_code=status_code, last_error=None,
                                           next_attempt_at=None)
            self._metrics.webhook_deliveries.labels("delivered").inc()
            return
        attempts = row["attempts"] + 1
        delay = min(self._settings.webhook_backoff * 2 ** (attempts - 1), MAX_BACKOFF) * random.uniform(0.9, 1.1)
        next_at = time.time() + delay
        if next_at > row["created_at"] + self._settings.webhook_retry_for:
            log.warning("webhooks: giving up on %s to %s after %d attempts: %s", row["event_type"],
                        shown_url(row["url"]), attempts, error)
            await self._db.update_delivery(row["id"], attempted=True, status="failed", last_attempt_at=now,
                                           last_status_code=status_code, last_error=error, next_attempt_at=None)
            self._metrics.webhook_deliveries.labels("failed").inc()
            return
        log.info("webhooks: %s to %s failed (%s); attempt %d in %.0f s", row["event_type"], shown_url(row["url"]),
                 error, attempts + 1, delay)
        await self._db.update_delivery(row["id"], attempted=True, last_attempt_at=now,
                                       last_status_code=status_code, last_error=error, next_attempt_at=next_at)

    async def _post(self, row: Any, secret: str) -> tuple[int | None, str | None]:
        """(status code or None, what went wrong or None). Only the status is read: the receiver's body is
        never downloaded."""
        assert self._client is not None
        body: str = row["payload"]
        moment = datetime.fromtimestamp(int(time.time()), tz=timezone.utc)
        headers = {
            "webhook-id": row["id"],
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": Webhook(secret).sign(row["id"], moment, body),
            "content-type": "application/json",
        }
        limit = self._settings.webhook_timeout
        try:
            # The whole attempt within the timeout: httpx's own applies to each read, which a receiver sending a
            # byte a second never exceeds.
            code = await asyncio.wait_for(self._status_of(row["url"], body, headers), limit)
        except asyncio.TimeoutError:
            return None, f"no complete answer within {limit:g}s (--webhook-timeout)"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500] if str(exc) else type(exc).__name__
        return code, None if 200 <= code < 300 else f"HTTP {code}"

    async def _status_of(self, url: str, body: str, headers: dict[str, str]) -> int:
        assert self._client is not None
        async with self._client.stream("POST", url, content=body.encode(), headers=headers) as response:
            return response.status_code
