"""Campaigns as HubSpot marketing events: one event per portal and campaign, callers as attendees.

Where the portal granted `crm.objects.marketing_events.write`, each campaign a caller came
from becomes one marketing event (created once, remembered in `app_state`) and every
synced caller of that campaign is recorded as having attended it at the event's time, so
HubSpot's marketing-event reports count the receptionist's callers per campaign. Without
the scope this is skipped and said once on the portal, not per event. Marketing events are
a report on top of the sync: a refusal here never fails a receptionist event. A marketing
event deleted in HubSpot is made again. When HubSpot cannot take an attendance now (down,
rate limited, timing out), the receptionist event is still done — its contact and its
call or note are in the CRM — and the attendance is queued as its own inbox event
(`campaigns.attendance`), retried and, if it never gets through, failed on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import TokenCipher
from app.db import transaction
from app.errors import (
    HubSpotAuthError,
    HubSpotConflict,
    HubSpotError,
    HubSpotValidationError,
    PermanentError,
    RefreshRejected,
)
from app.hubspot import HubSpotClient, hubspot_client
from app.inbox import Done, EventView, HandlerContext, NewEvent, Outcome, enqueue_many, registry
from app.models import AppState, EventSource, Portal, utcnow
from app.portals import clear_problem, problem_codes, record_problem

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
# An inbox event per attendance HubSpot could not take while its call synced.
ATTENDANCE_EVENT = "campaigns.attendance"


@dataclass(frozen=True)
class Attendance:
    campaign_id: str
    contact_id: str
    at: datetime
    event_id: int | None = None  # the receptionist event it comes from

    def payload(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "contact_id": self.contact_id,
            "at": self.at.isoformat(),
            "event_id": self.event_id,
        }

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Attendance:
        event_id = payload.get("event_id")
        return cls(
            str(payload["campaign_id"]),
            str(payload["contact_id"]),
            datetime.fromisoformat(str(payload["at"])),
            int(event_id) if event_id is not None else None,
        )


def event_name(campaign_id: str) -> str:
    return f"AI receptionist — {campaign_id}"


def _state_key(portal_id: int, campaign_id: str) -> str:
    # Campaign ids can be long; the key column is short.
    digest = hashlib.sha256(campaign_id.encode()).hexdigest()[:32]
    return f"mevent:{portal_id}:{digest}"


@dataclass
class Recording:
    """What `record_attendance` could not do: attendances to try again later (and why), and
    those HubSpot refused."""

    later: list[Attendance] = field(default_factory=list)
    error: HubSpotError | None = None  # the failure behind `later`
    # Answered in a 207 as not recorded (HubSpot cannot find the contact): retrying
    # would meet the same answer.
    refused: list[Attendance] = field(default_factory=list)


async def record_attendance(
    services: Services,
    client: HubSpotClient,
    *,
    scopes: frozenset[str],
    known_problems: set[str],
    attendances: list[Attendance],
) -> Recording:
    """Record the callers' attendance at their campaigns' marketing events.

    A refusal (missing scope, invalid data) is reported on the portal and not tried again;
    a marketing event deleted in HubSpot is made again. Any other failure (HubSpot down,
    rate limited, timing out) leaves the attendances it concerns in `later`. Those a 207
    leaves out (contacts HubSpot cannot find) are in `refused`.
    """
    portal_id = client.portal_id
    recording = Recording()
    if not attendances:
        return recording
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
        return recording
    by_campaign: dict[str, list[Attendance]] = {}
    for attendance in attendances:
        by_campaign.setdefault(attendance.campaign_id, []).append(attendance)
    for campaign_id, group in by_campaign.items():
        for start in range(0, len(group), BATCH_LIMIT):
            chunk = group[start : start + BATCH_LIMIT]
            try:
                refused = await _record_chunk(services, client, campaign_id, chunk)
            except RefreshRejected:
                raise  # the portal is gone: the worker parks its events
            except HubSpotAuthError as error:
                if error.status_code != 403:
                    _later(recording, chunk, error)
                    continue
                await _problem(
                    services,
                    portal_id,
                    SCOPE_PROBLEM,
                    f"HubSpot refused to record marketing events (missing scope {WRITE_SCOPE}).",
                )
                known_problems.add(SCOPE_PROBLEM)
                return recording
            except HubSpotValidationError as error:
                await _problem(
                    services,
                    portal_id,
                    REFUSED_PROBLEM,
                    "HubSpot refused a campaign's marketing event or attendance "
                    f"({error.category or error.status_code}, correlationId "
                    f"{error.correlation_id}).",
                )
                known_problems.add(REFUSED_PROBLEM)
            except HubSpotError as error:
                _later(recording, chunk, error)
            else:
                if SCOPE_PROBLEM in known_problems:
                    # Recorded, so the scope is granted now (a re-consent after an
                    # upgrade): the portal's notice that it is missing goes.
                    async with transaction(services.sessions) as session:
                        await clear_problem(portal_id, SCOPE_PROBLEM, session=session)
                    known_problems.discard(SCOPE_PROBLEM)
                if refused:
                    log.warning(
                        "marketing events: HubSpot recorded no attendance for %d of %d "
                        "contacts (it cannot find them)",
                        len(refused),
                        len(chunk),
                        extra={"portal_id": portal_id},
                    )
                recording.refused.extend(refused)
    return recording


def _later(recording: Recording, chunk: list[Attendance], error: HubSpotError) -> None:
    log.warning(
        "marketing events: attendance left for later (%s)",
        error.status_code or type(error).__name__,
        extra={"portal_id": error.portal_id, "correlation_id": error.correlation_id},
    )
    # Nothing here needs search to settle a lost answer: an event made meanwhile answers
    # 409 and attendance is recorded by contact id, so the retry need not wait for search.
    error.ambiguous = False
    recording.later.extend(chunk)
    recording.error = error


def external_event_id(campaign_id: str) -> str:
    """The marketing event's external id: the campaign id, unless it cannot be a segment of
    the attendance URL ("fb/summer" is read as two, ".." as the parent), then a digest of
    it (the event's name still shows the campaign id)."""
    if "/" in campaign_id or "\\" in campaign_id or campaign_id in (".", ".."):
        return "hubline-" + hashlib.sha256(campaign_id.encode()).hexdigest()[:32]
    return campaign_id


async def _record_chunk(
    services: Services, client: HubSpotClient, campaign_id: str, chunk: list[Attendance]
) -> list[Attendance]:
    """Record a chunk's attendance; answers those HubSpot did not record though it answered 2xx."""
    path = (
        f"{ATTENDANCE_PATH}/{quote(external_event_id(campaign_id), safe='')}/attend/create"
        f"?externalAccountId={client.portal_id}"
    )
    inputs = [
        {"vid": int(a.contact_id), "interactionDateTime": int(a.at.timestamp() * 1000)}
        for a in chunk
    ]
    await _ensure_event(services, client, campaign_id)
    try:
        answer = await client.post_json(path, {"inputs": inputs})
    except HubSpotError as error:
        if error.status_code != 404:
            raise
        # The event Hubline remembered was deleted in HubSpot: make it again.
        log.info("marketing event gone; making it again", extra={"portal_id": client.portal_id})
        await _forget_event(services, client.portal_id, campaign_id)
        await _ensure_event(services, client, campaign_id)
        answer = await client.post_json(path, {"inputs": inputs})
    return _not_recorded(chunk, answer)


def _not_recorded(chunk: list[Attendance], answer: Any) -> list[Attendance]:
    """The attendances a 2xx answer leaves out: with errors in it, those absent from its results."""
    # HubSpot answers a batch it took in part with 207, the contacts it recorded in
    # `results` and what went wrong in `errors`.
    if not isinstance(answer, dict) or not (answer.get("errors") or answer.get("numErrors")):
        return []
    recorded = {
        str(result.get("vid")) for result in answer.get("results") or [] if isinstance(result, dict)
    }
    return [attendance for attendance in chunk if attendance.contact_id not in recorded]


async def _ensure_event(services: Services, client: HubSpotClient, campaign_id: str) -> None:
    key = _state_key(client.portal_id, campaign_id)
    async with services.sessions() as session:
        if await session.get(AppState, key) is not None:
            return
    body = {
        "externalEventId": external_event_id(campaign_id),
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


async def try_later(
    portal_id: int,
    attendances: list[Attendance],
    *,
    session: AsyncSession,
    cipher: TokenCipher,
) -> None:
    """Queue attendances HubSpot could not take now, one inbox event each, in the caller's
    transaction (the one marking their receptionist events done), so none is lost."""
    now = utcnow()
    await enqueue_many(
        [
            NewEvent(
                portal_id=portal_id,
                source=EventSource.internal,
                type=ATTENDANCE_EVENT,
                idempotency_key=f"{ATTENDANCE_EVENT}:{a.event_id}",
                occurred_at=now,
                payload=a.payload(),
            )
            for a in attendances
        ],
        session=session,
        cipher=cipher,
    )


@registry.handler(ATTENDANCE_EVENT, batch_size=BATCH_LIMIT)
async def handle_attendance(ctx: HandlerContext, events: list[EventView]) -> dict[int, Outcome]:
    """Record attendances a receptionist sync left for later; each is retried on its own."""
    outcomes: dict[int, Outcome] = {}
    pending: dict[int, Attendance] = {}
    for event in events:
        if not event.payload:
            outcomes[event.id] = Done(result={"skipped": "payload deleted"})
            continue
        try:
            pending[event.id] = Attendance.of(event.payload)
        except (KeyError, TypeError, ValueError):
            outcomes[event.id] = PermanentError("the stored event is not an attendance")
    if not pending:
        return outcomes
    async with ctx.services.sessions() as session:
        portal = await session.get(Portal, ctx.portal_id)
        problems = await problem_codes(ctx.portal_id, session=session)
    recording = await record_attendance(
        ctx.services,
        hubspot_client(ctx.services, ctx.portal_id),
        scopes=portal.scope_set if portal is not None else frozenset(),
        known_problems=problems,
        attendances=list(pending.values()),
    )
    later = {id(a) for a in recording.later}
    refused = {id(a) for a in recording.refused}
    for event_id, attendance in pending.items():
        if id(attendance) in later and recording.error is not None:
            outcomes[event_id] = recording.error
        elif id(attendance) in refused:
            outcomes[event_id] = PermanentError(
                "HubSpot recorded no attendance: it cannot find the contact"
            )
        else:
            outcomes[event_id] = Done(result={"campaign_id": attendance.campaign_id})
    return outcomes


async def _forget_event(services: Services, portal_id: int, campaign_id: str) -> None:
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.delete(AppState)
            .where(col(AppState.name) == _state_key(portal_id, campaign_id))
            .execution_options(synchronize_session=False)
        )


async def _problem(services: Services, portal_id: int, code: str, message: str) -> None:
    async with transaction(services.sessions) as session:
        await record_problem(portal_id, code, message, session=session)
    log.warning("marketing events: %s", code, extra={"portal_id": portal_id})
