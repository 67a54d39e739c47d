"""Helpers for the receptionist-sync tests: posting events through the real route, draining."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from app.main import close_services, open_services
from app.models import EngagementRecord, InboxEvent
from app.sandbox.objects import create_object
from app.sandbox.state import UI_SOURCE
from app.worker import Worker

BASE_TIME = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
_ids = itertools.count(1)


def call(**overrides: Any) -> dict[str, Any]:
    """A nested call.completed event; keyword arguments override fields."""
    number = next(_ids)
    event: dict[str, Any] = {
        "id": f"evt_{number}",
        "type": "call.completed",
        "occurred_at": (BASE_TIME + timedelta(seconds=number)).isoformat(),
        "caller": {"name": "Ada Lovelace", "phone": "+1 415 555 0100", "email": "ada@example.com"},
        "summary": "Wants a cleaning appointment next week",
        "transcript": "Caller: hello",
        "duration_seconds": 480,
        "outcome": "Appointment Booked",
        "appointment_booked": True,
        "lead_score": 82,
        "follow_up_required": False,
        "recording_url": "https://recordings.example.com/1.mp3",
    }
    event.update(overrides)
    return event


async def post_event(client: Any, portal: Any, event: dict[str, Any]) -> Any:
    response = await client.post(
        f"/webhooks/portals/{portal.portal_id}/receptionist",
        json=event,
        headers={"Authorization": f"Bearer {portal.webhook_secret}"},
    )
    assert response.status_code in (200, 201, 202), response.text
    return response


async def post_events(client: Any, portal: Any, events: list[dict[str, Any]]) -> None:
    """Post events fifty at a time, in bursts as a busy receptionist platform sends them."""
    for start in range(0, len(events), 50):
        await asyncio.gather(*(post_event(client, portal, e) for e in events[start : start + 50]))


async def drain(services: Any, timeout: float = 20.0, **worker_options: Any) -> None:
    await Worker(services, poll_seconds=0.01, **worker_options).drain(timeout=timeout)


async def drain_through(
    settings: Any, transport: httpx.AsyncBaseTransport, **worker_options: Any
) -> None:
    """Drain with a worker of its own whose HubSpot requests go through `transport`."""
    resources = await open_services(settings, transport=transport)
    try:
        await drain(resources, **worker_options)
    finally:
        await close_services(resources)


def portal_requests(sandbox: Any, portal_id: int) -> int:
    """HubSpot API requests the sandbox served for a portal so far."""
    return sum(n for (pid, _, _), n in sandbox.request_counts.items() if pid == portal_id)


def endpoint_requests(sandbox: Any, portal_id: int, prefix: str) -> dict[str, int]:
    """Answered requests of a portal to endpoints under `prefix`, by the rest of the path."""
    counts: dict[str, int] = {}
    for (pid, endpoint, status), n in sandbox.request_counts.items():
        path = endpoint.split(" ", 1)[-1]
        if pid == portal_id and status < 400 and path.startswith(prefix + "/"):
            rest = path.removeprefix(prefix + "/")
            counts[rest] = counts.get(rest, 0) + n
    return counts


def rate_limited(sandbox: Any, portal_id: int) -> int:
    return sum(
        n
        for (pid, _, status), n in sandbox.request_counts.items()
        if pid == portal_id and status == 429
    )


async def events_by_status(services: Any) -> dict[str, int]:
    async with services.sessions() as session:
        rows = await session.execute(
            sa.select(InboxEvent.status, sa.func.count()).group_by(InboxEvent.status)
        )
        return {row[0]: row[1] for row in rows}


async def engagement_rows(services: Any) -> list[EngagementRecord]:
    async with services.sessions() as session:
        return list((await session.execute(sa.select(EngagementRecord))).scalars())


def person_contact(sandbox: Any, portal_id: int, **properties: str) -> Any:
    """A contact a person typed into HubSpot's UI."""
    world = sandbox.portal(portal_id)
    return create_object(sandbox, world, "contacts", {"properties": properties}, UI_SOURCE)


async def inbox_events(services: Any, source: str = "receptionist") -> list[InboxEvent]:
    """The inbox's events from one source (the receptionist's by default), oldest first."""
    async with services.sessions() as session:
        rows = await session.execute(
            sa.select(InboxEvent).where(InboxEvent.source == source).order_by(InboxEvent.id)
        )
        return list(rows.scalars())
