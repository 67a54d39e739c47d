"""Receptionist events for a run, signed as the receptionist platform signs them, and sent.

Every event carries its own id in its summary, so the engagement it becomes in the
sandbox can be traced back to it; callers repeat within a portal, so a duplicated
contact shows up as two contacts with one phone.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
from standardwebhooks.webhooks import Webhook

EVENT_MARK = "reliability-event"
BASE_TIME = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AREA_CODES = ("415", "212", "312", "617", "206", "303", "512", "404")


@dataclass(frozen=True)
class PlannedEvent:
    portal_id: int
    event_id: str
    type: str
    caller_phone: str
    body: bytes

    @property
    def engagement_kind(self) -> str:
        return "calls" if self.type == "call.completed" else "notes"


def caller_phone(caller: int) -> str:
    area = AREA_CODES[caller % len(AREA_CODES)]
    return f"+1 {area} 555 {100 + caller // len(AREA_CODES):04d}"


def plan_events(
    portal_ids: list[int],
    count: int,
    *,
    rng: random.Random,
    callers_per_portal: int = 40,
    prefix: str = "rel",
    start: datetime = BASE_TIME,
) -> list[PlannedEvent]:
    """`count` events spread over the portals, one second apart per portal."""
    events = []
    for index in range(count):
        portal_id = portal_ids[index % len(portal_ids)]
        caller = rng.randrange(callers_per_portal)
        event_type = rng.choices(
            ["call.completed", "text.received", "chat.completed"], weights=[6, 2, 2]
        )[0]
        event_id = f"{prefix}-{portal_id}-{index}"
        occurred = start + timedelta(seconds=index // len(portal_ids))
        phone = caller_phone(caller)
        body = {
            "id": event_id,
            "type": event_type,
            "occurred_at": occurred.isoformat().replace("+00:00", "Z"),
            "caller": {
                "name": f"Caller {caller} Test",
                "phone": phone,
                "email": f"caller{caller}@example.com",
            },
            "summary": f"{EVENT_MARK} {event_id}",
            "duration_seconds": 60 + index % 300,
            "outcome": "Message Taken",
            "appointment_booked": index % 5 == 0,
            "lead_score": index % 100,
            "follow_up_required": index % 3 == 0,
        }
        encoded = json.dumps(body, separators=(",", ":")).encode()
        events.append(PlannedEvent(portal_id, event_id, event_type, phone, encoded))
    return events


def signed_headers(
    secret: str, msg_id: str, body: bytes, *, at: float | None = None
) -> dict[str, str]:
    """Standard Webhooks headers, as the receptionist platform sends them."""
    when = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
        "content-type": "application/json",
    }


@dataclass
class DeliveryLog:
    """Every delivery attempt's answer, per event id."""

    answers: dict[str, list[int]] = field(default_factory=dict)
    sent: int = 0
    errors: int = 0
    error_types: dict[str, int] = field(default_factory=dict)

    def record(self, event_id: str, status: int) -> None:
        self.answers.setdefault(event_id, []).append(status)
        self.sent += 1

    def accepted(self) -> set[str]:
        return {e for e, statuses in self.answers.items() if any(200 <= s < 300 for s in statuses)}

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for statuses in self.answers.values():
            for status in statuses:
                counts[status] = counts.get(status, 0) + 1
        return counts


async def deliver(
    client: httpx.AsyncClient, secret: str, event: PlannedEvent, log: DeliveryLog
) -> int:
    """One delivery; the HTTP status, or 0 when no answer came."""
    path = f"/webhooks/portals/{event.portal_id}/receptionist"
    try:
        response = await client.post(
            path, content=event.body, headers=signed_headers(secret, event.event_id, event.body)
        )
        status = response.status_code
    except httpx.HTTPError as error:
        status = 0
        log.errors += 1
        name = type(error).__name__
        log.error_types[name] = log.error_types.get(name, 0) + 1
    log.record(event.event_id, status)
    return status


async def deliver_all(
    web_url: str,
    secrets: dict[int, str],
    deliveries: list[PlannedEvent],
    log: DeliveryLog,
    *,
    concurrency: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Send each delivery once, `concurrency` at a time."""
    queue: asyncio.Queue[PlannedEvent] = asyncio.Queue()
    for event in deliveries:
        queue.put_nowait(event)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=web_url, timeout=30, limits=limits) as client:

        async def sender() -> None:
            while True:
                try:
                    event = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await deliver(client, secrets[event.portal_id], event, log)
                if on_progress is not None:
                    on_progress(log.sent)

        await asyncio.gather(*(sender() for _ in range(concurrency)))
