"""Demo traffic: a handful of realistic receptionist events for each installed portal.

`hubline dev --demo` calls `send_demo`, which posts them through the real receptionist
webhook (Bearer secret), so a newcomer sees contacts, calls and notes appear in the sandbox
within seconds: new callers, a returning caller whose phone is written another way, a
text, a chat, the flat post-call form and a campaign. Event ids are fresh on every run.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

CAMPAIGN = "google-ads-spring"


def demo_events(now: datetime | None = None) -> list[dict[str, Any]]:
    """The demo events, oldest first (ids unique to this call)."""
    now = now or datetime.now(UTC)
    run = uuid.uuid4().hex[:8]

    def at(minutes_ago: int) -> str:
        return (now - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")

    return [
        {
            "id": f"demo_{run}_1",
            "type": "call.completed",
            "occurred_at": at(50),
            "caller": {
                "name": "Ada Lovelace",
                "phone": "+1 415 555 0100",
                "email": "ada@example.com",
            },
            "summary": "Wants a cleaning appointment next week; prefers mornings.",
            "transcript": "Receptionist: How can I help?\nCaller: I'd like a cleaning.",
            "duration_seconds": 184,
            "outcome": "Appointment Booked",
            "appointment_booked": True,
            "lead_score": 82,
            "follow_up_required": False,
            "campaign_id": CAMPAIGN,
            "recording_url": "https://recordings.example.com/demo-1.mp3",
        },
        {
            "id": f"demo_{run}_2",
            "type": "call.completed",
            "occurred_at": at(40),
            "caller": {"name": "Grace Hopper", "phone": "(415) 555-0142"},
            "summary": "Asked whether Saturday appointments are available.",
            "duration_seconds": 95,
            "outcome": "Question Answered",
            "appointment_booked": False,
            "lead_score": 55,
            "follow_up_required": True,
        },
        {
            "id": f"demo_{run}_3",
            "type": "text.received",
            "occurred_at": at(30),
            "caller": {"name": "Alan Turing", "phone": "415-555-0199"},
            "summary": "Texted to confirm tomorrow's 9:00 appointment.",
            "transcript": "Caller: Confirming tomorrow at 9?\nReceptionist: Yes, see you then!",
            "outcome": "Message Taken",
            "lead_score": 40,
        },
        {
            "id": f"demo_{run}_4",
            "type": "chat.completed",
            "occurred_at": at(20),
            "caller": {"name": "Katherine Johnson", "email": "katherine@example.com"},
            "summary": "Chatted about whitening prices and insurance.",
            "transcript": "Visitor: How much is whitening?\nReceptionist: It starts at $299.",
            "outcome": "Question Answered",
            "lead_score": 67,
            "follow_up_required": True,
            "campaign_id": CAMPAIGN,
        },
        {
            # The flat post-call form; a returning caller, phone written another way.
            "call_id": f"demo_{run}_5",
            "caller_name": "Ada Lovelace",
            "caller_phone": "415.555.0100",
            "caller_email": "ada@example.com",
            "call_summary": "Called back to move her appointment to Thursday.",
            "appointment_booked": True,
            "duration_seconds": 62,
            "outcome": "Rescheduled",
            "occurred_at": at(10),
        },
        {
            "id": f"demo_{run}_6",
            "type": "call.completed",
            "occurred_at": at(5),
            "caller": {"name": "Hedy Lamarr", "phone": "+44 20 7946 0958"},
            "summary": "Called from abroad about an emergency appointment; transferred.",
            "duration_seconds": 240,
            "outcome": "Transferred",
            "lead_score": 90,
            "follow_up_required": True,
        },
    ]


async def send_demo(
    hubline_url: str,
    portals: list[tuple[int, str]],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Post the demo events to every (portal id, secret); returns how many were accepted."""
    accepted = 0
    async with httpx.AsyncClient(
        base_url=hubline_url.rstrip("/"), transport=transport, timeout=10.0
    ) as http:
        for portal_id, secret in portals:
            for event in demo_events():
                response = await http.post(
                    f"/webhooks/portals/{portal_id}/receptionist",
                    json=event,
                    headers={"Authorization": f"Bearer {secret}"},
                )
                accepted += response.is_success
    return accepted
