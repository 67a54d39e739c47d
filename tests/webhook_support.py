"""Helpers for the webhook and contact-handler tests: portals, signed requests, inbox reads."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
from sqlmodel import col
from standardwebhooks.webhooks import Webhook

from app.crypto import Secret, TokenCipher
from app.db import SessionFactory, transaction
from app.inbox import read_payload
from app.models import IdentityEntry, InboxEvent, Portal, PortalStatus
from app.portals import create_secret
from app.sandbox.webhooks import signature_v3

HUBSPOT_PATH = "/webhooks/hubspot"


def receptionist_path(portal_id: int | str) -> str:
    return f"/webhooks/portals/{portal_id}/receptionist"


async def add_portal(
    sessions: SessionFactory,
    cipher: TokenCipher,
    portal_id: int,
    *,
    status: PortalStatus = PortalStatus.active,
    region: str | None = None,
) -> Secret:
    """A portal row and its receptionist secret, as an install leaves them."""
    async with transaction(sessions) as session:
        session.add(Portal(portal_id=portal_id, status=status, default_phone_region=region))
        await session.flush()
        return await create_secret(portal_id, session=session, cipher=cipher)


def standard_headers(
    secret: Secret | str,
    body: bytes,
    *,
    msg_id: str = "msg_1",
    timestamp: float | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers signing `body` with `secret`."""
    plain = secret.reveal() if isinstance(secret, Secret) else secret
    when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(plain).sign(msg_id, when, body.decode()),
        "content-type": "application/json",
    }


def hubspot_headers(
    secret: str, url: str, body: bytes, *, timestamp_ms: int | None = None
) -> dict[str, str]:
    """HubSpot's v3 headers, made by the sandbox's own signer (an independent implementation)."""
    stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return {
        "X-HubSpot-Signature-v3": signature_v3(secret, "POST", url, body, stamp),
        "X-HubSpot-Request-Timestamp": str(stamp),
        "content-type": "application/json",
    }


def call_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "evt_01",
        "type": "call.completed",
        "occurred_at": "2026-03-02T14:30:00Z",
        "caller": {"name": "Ada Lovelace", "phone": "+1 415 555 0100", "email": "ada@example.com"},
        "summary": "Wants a cleaning appointment next week",
        "duration_seconds": 480,
        "outcome": "Appointment Booked",
        "appointment_booked": True,
        "lead_score": 82,
        "follow_up_required": False,
        "campaign_id": "google-ads-spring",
    }
    event.update(overrides)
    return event


def hubspot_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "eventId": 1,
        "subscriptionId": 500_001,
        "portalId": 1001,
        "appId": 424242,
        "occurredAt": 1_767_225_600_000,
        "subscriptionType": "contact.creation",
        "attemptNumber": 0,
        "objectId": 51,
        "changeSource": "CRM_UI",
    }
    event.update(overrides)
    return event


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


async def post_hubspot(
    client: httpx.AsyncClient, secret: str, events: Any, *, public_url: str = "http://hubline.test"
) -> httpx.Response:
    body = events if isinstance(events, bytes) else dumps(events)
    headers = hubspot_headers(secret, public_url + HUBSPOT_PATH, body)
    return await client.post(HUBSPOT_PATH, content=body, headers=headers)


async def inbox_rows(sessions: SessionFactory) -> list[InboxEvent]:
    async with sessions() as session:
        rows = await session.execute(sa.select(InboxEvent).order_by(col(InboxEvent.id)))
        return list(rows.scalars())


async def payloads(sessions: SessionFactory, cipher: TokenCipher) -> list[dict[str, Any]]:
    return [read_payload(row, cipher) for row in await inbox_rows(sessions)]


async def identity_rows(sessions: SessionFactory) -> list[IdentityEntry]:
    async with sessions() as session:
        rows = await session.execute(sa.select(IdentityEntry).order_by(col(IdentityEntry.id)))
        return list(rows.scalars())
