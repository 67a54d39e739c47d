"""Outgoing HubSpot webhooks: signatures (v3 and the legacy v1) and batched, retried delivery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import re
from typing import Any

import httpx

from app.sandbox.state import SandboxState, WebhookDelivery

BATCH_SIZE = 100
MAX_CONCURRENT_REQUESTS = 10

# HubSpot's v3 recipe decodes only these escapes in the URL before signing. This is
# deliberately a separate implementation from app/signatures.py: the sandbox plays
# HubSpot, and sharing the code would let one bug sign and verify alike unnoticed.
_SIGNED_URL_ESCAPES = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
_ESCAPE_RE = re.compile("|".join(_SIGNED_URL_ESCAPES), re.IGNORECASE)


def signed_url(url: str) -> str:
    """The URL as HubSpot's v3 signature covers it."""
    return _ESCAPE_RE.sub(lambda m: _SIGNED_URL_ESCAPES[m.group(0).upper()], url)


def signature_v3(secret: str, method: str, url: str, body: bytes, timestamp_ms: int) -> str:
    """base64(HMAC-SHA256(secret, method + url + body + timestamp))."""
    message = method.encode() + signed_url(url).encode() + body + str(timestamp_ms).encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def signature_v1(secret: str, body: bytes) -> str:
    """hex(sha256(secret + body)), the legacy signature."""
    return hashlib.sha256(secret.encode() + body).hexdigest()


def signature_v2(secret: str, method: str, url: str, body: bytes) -> str:
    """hex(sha256(secret + method + url + body)), the other legacy signature."""
    return hashlib.sha256(secret.encode() + method.encode() + url.encode() + body).hexdigest()


def signed_headers(secret: str, url: str, body: bytes, timestamp_ms: int) -> dict[str, str]:
    """The headers HubSpot sends with a webhook request."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "HubSpot Connect 2.0 (http://dev.hubspot.com/) - sandbox",
        "X-HubSpot-Signature-v3": signature_v3(secret, "POST", url, body, timestamp_ms),
        "X-HubSpot-Request-Timestamp": str(timestamp_ms),
        "X-HubSpot-Signature": signature_v1(secret, body),
        "X-HubSpot-Signature-Version": "v1",
    }


class WebhookDispatcher:
    """Batches queued events per portal and POSTs them to the target URL, retrying failures."""

    def __init__(self, state: SandboxState, client: httpx.AsyncClient) -> None:
        self.state = state
        self.client = client
        self._batch_ids = itertools.count(1)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._changed = asyncio.Event()

    def start(self) -> None:
        """Start waiting for events."""
        self._runner = asyncio.create_task(self._run(), name="sandbox-webhooks")

    async def aclose(self) -> None:
        """Stop, abandoning pending retries."""
        tasks = [t for t in (self._runner, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self.state.webhook_wakeup.wait()
            # Wait a moment so changes made together go out in one request, as HubSpot batches.
            await asyncio.sleep(self.state.config.webhook_batch_delay)
            self.state.webhook_wakeup.clear()
            self.flush()

    def flush(self) -> None:
        """Send everything queued now, in batches of up to 100 events per portal."""
        events, self.state.webhook_outbox = self.state.webhook_outbox, []
        by_portal: dict[int, list[dict[str, Any]]] = {}
        for event in events:
            by_portal.setdefault(event["portalId"], []).append(event)
        for portal_events in by_portal.values():
            for start in range(0, len(portal_events), BATCH_SIZE):
                batch = portal_events[start : start + BATCH_SIZE]
                task = asyncio.create_task(self._deliver(next(self._batch_ids), batch))
                self._deliveries.add(task)
                task.add_done_callback(self._delivered)
        self._changed.set()

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._changed.set()

    def busy(self) -> bool:
        """Whether events are queued or being delivered (pending retries included)."""
        state = self.state
        return bool(state.webhook_outbox or self._deliveries or state.webhook_wakeup.is_set())

    async def idle(self) -> None:
        """Wait until nothing is queued or being delivered; wrap it in `asyncio.timeout`."""
        while self.busy():
            self._changed.clear()
            await self._changed.wait()

    async def _deliver(self, batch_id: int, events: list[dict[str, Any]]) -> None:
        config = self.state.config
        attempt = 0
        while True:
            url = config.webhook_target_url
            if not url:
                return
            payload = [{**event, "attemptNumber": attempt} for event in events]
            body = json.dumps(payload).encode()
            timestamp_ms = int(self.state.now() * 1000)
            headers = signed_headers(config.client_secret, url, body, timestamp_ms)
            status: int | None = None
            error: str | None = None
            try:
                async with self._slots, asyncio.timeout(config.webhook_timeout):
                    response = await self.client.post(url, content=body, headers=headers)
                status = response.status_code
            except (httpx.HTTPError, TimeoutError) as exc:
                error = type(exc).__name__
            self.state.webhook_deliveries.append(
                WebhookDelivery(batch_id, attempt, self.state.now(), len(events), status, error)
            )
            if status is not None and 200 <= status < 300:
                return
            if attempt >= config.webhook_max_retries:
                return
            delay = min(
                config.webhook_retry_base_delay * 2**attempt, config.webhook_retry_max_delay
            )
            attempt += 1
            await asyncio.sleep(delay)
