"""Campaigns as HubSpot marketing events: one event per portal and campaign, callers as attendees.

Where the portal granted `crm.objects.marketing_events.write`, each campaign a caller came
from becomes one marketing event (created once, remembered in `app_state`) and every
synced caller of that campaign is recorded as having attended it at the event's time, so
HubSpot's marketing-event reports count the receptionist's callers per campaign. Without
the scope this is skipped and said once on the portal, not per event. Marketing events are
a report on top of the sync: a refusal here never fails a receptionist event.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from app.db import transaction
from app.errors import HubSpotAuthError, HubSpotConflict, HubSpotValidationError
from app.hubspot import HubSpotClient
from app.models import AppState
from app.portals import record_problem

if TYPE_CHECKING:
    from app.main import Services

log = logging.getLogger(__name__)

WRITE_SCOPE = "crm.objects.marketing_events.write"
SCOPE_PROBLEM = "marketing_events:scope"
REFUSED_PROBLEM = "marketing_events:refused"
EVENTS_PATH = "/marketing/v3/marketing-events/events"
ATTENDANCE_PATH = "/marketing/v3/marketing-events/attendance"
ORGANIZER = "Hubline"
BATCH_LIMIT = 100


@dataclass(frozen=True)
class Attendance:
    campaign_id: str
    contact_id: str
    at: datetime


def event_name(campaign_id: str) -> str:
    return f"AI receptionist — {campaign_id}"


def _state_key(portal_id: int, campaign_id: str) -> str:
    # Campaign ids can be long; the key column is short.
    digest = hashlib.sha256(campaign_id.encode()).hexdigest()[:32]
    return f"mevent:{portal_id}:{digest}"


async def record_attendance(
    services: Services,
    client: HubSpotClient,
    *,
    scopes: frozenset[str],
    known_problems: set[str],
    attendances: list[Attendance],
) -> int:
    """Record the callers' attendance at their campaigns' marketing events; returns how many."""
    portal_id = client.portal_id
    if not attendances:
        return 0
    if WRITE_SCOPE not in scopes:
        if SCOPE_PROBLEM not in known_problems:
            await _problem(
                services,
                portal_id,
                SCOPE_PROBLEM,
                "Campaigns are saved on contacts, but not as marketing events: the portal did "
                f"not grant {WRITE_SCOPE} (it may need a higher HubSpot tier).",
            )
            known_problems.add(SCOPE_PROBLEM)
        return 0
    by_campaign: dict[str, list[Attendance]] = {}
    for attendance in attendances:
        by_campaign.setdefault(attendance.campaign_id, []).append(attendance)
    recorded = 0
    try:
        for campaign_id, group in by_campaign.items():
            await _ensure_event(services, client, campaign_id)
            path = (
                f"{ATTENDANCE_PATH}/{quote(campaign_id, safe='')}/attend/create"
                f"?externalAccountId={portal_id}"
            )
            for start in range(0, len(group), BATCH_LIMIT):
                inputs = [
                    {"vid": int(a.contact_id), "interactionDateTime": int(a.at.timestamp() * 1000)}
                    for a in group[start : start + BATCH_LIMIT]
                ]
                await client.post_json(path, {"inputs": inputs})
                recorded += len(inputs)
    except HubSpotAuthError as error:
        if error.status_code != 403:
            raise
        await _problem(
            services,
            portal_id,
            SCOPE_PROBLEM,
            f"HubSpot refused to record marketing events (missing scope {WRITE_SCOPE}).",
        )
    except HubSpotValidationError as error:
        await _problem(
            services,
            portal_id,
            REFUSED_PROBLEM,
            "HubSpot refused a campaign's marketing event or attendance "
            f"({error.category or error.status_code}, correlationId {error.correlation_id}).",
        )
    return recorded


async def _ensure_event(services: Services, client: HubSpotClient, campaign_id: str) -> None:
    key = _state_key(client.portal_id, campaign_id)
    async with services.sessions() as session:
        if await session.get(AppState, key) is not None:
            return
    body = {
        "externalEventId": campaign_id,
        "externalAccountId": str(client.portal_id),
        "eventName": event_name(campaign_id),
        "eventOrganizer": ORGANIZER,
        "eventType": "AI receptionist campaign",
        "customProperties": [],
    }
    with contextlib.suppress(HubSpotConflict):  # made before Hubline could remember it
        await client.post_json(EVENTS_PATH, body)
    async with transaction(services.sessions) as session:
        if await session.get(AppState, key) is None:
            session.add(AppState(name=key, value=campaign_id))


async def _problem(services: Services, portal_id: int, code: str, message: str) -> None:
    async with transaction(services.sessions) as session:
        await record_problem(portal_id, code, message, session=session)
    log.warning("marketing events: %s", code, extra={"portal_id": portal_id})
