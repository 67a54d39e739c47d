"""Webhook intake: HubSpot's signed app webhook and each portal's receptionist webhook.

Both routes verify at the edge, store into the inbox in one transaction, and answer 2xx
only after it commits (receptionist events arriving together share one: `InboxWriter`).
Checks run in DESIGN.md's order: 413 body too large, 404 unknown portal (receptionist
route), 401 authentication, 400 malformed JSON, 422 invalid event, 503 database
unavailable. Nothing rejected is stored; a repeat is a 2xx that stores nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from app.contacts import CONTACT_EVENT_TYPES
from app.crypto import TokenCipher
from app.db import DATABASE_ERRORS, fits_bigint, transaction
from app.errors import EventRejected
from app.inbox import NewEvent, enqueue
from app.main import Services, services
from app.metrics import counted
from app.middleware import portal_of_path
from app.models import PRIVACY_DELETION, EventSource, EventStatus, Portal, PortalStatus, utcnow
from app.portals import KnownPortal
from app.receptionist import parse_event
from app.signatures import (
    authenticate_receptionist,
    hubspot_signed_url,
    signed_outside_window,
    verify_hubspot_v3,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
STALE_TIMESTAMP = (
    "the signature is right but webhook-timestamp is more than 5 minutes from Hubline's "
    "clock: check the sender's clock (a replayed request is refused the same way)"
)
MAX_HUBSPOT_EVENTS = 100


Clock = Callable[[], float]
Endpoint = Callable[[Request], Awaitable[Response]]


def error_response(status: int, reason: str, detail: Any = None) -> JSONResponse:
    """DESIGN.md's error answer: `{"error": reason, "detail": detail}`."""
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


def database_unavailable(error: BaseException) -> JSONResponse:
    log.warning("webhook not stored: database unavailable (%s)", type(error).__name__)
    return error_response(503, "database_unavailable", "the event was not stored; retry later")


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request) -> bytes:
    """The raw body; BodyTooLarge past MAX_BODY_BYTES (before reading, when it is declared)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    # A chunked body declares no length: count while reading and stop at the limit.
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> JSONResponse:
    return error_response(413, "body_too_large", f"the body must not exceed {MAX_BODY_BYTES} bytes")


def _parse_json(body: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(body)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; a body nested deeper than
    # the parser's recursion limit (a 1 MiB body can nest 500,000 deep) is malformed too.
    except (ValueError, RecursionError):
        return False, None


# --- HubSpot --------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpotEvent:
    """One event of HubSpot's batch, with what identifies it."""

    portal_id: int
    app_id: str
    subscription_type: str
    occurred_at: datetime
    idempotency_key: str
    raw: dict[str, Any]


def _integer(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # Read up to far past any id or time (one past BIGINT is then an unknown portal), but
    # not to the 4,300 digits past which int() itself refuses a string.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 100:
        return int(value)
    return None


def parse_hubspot_event(raw: Any, position: int) -> HubSpotEvent | list[dict[str, str]]:
    """The event, or the problems that make it unusable."""
    if not isinstance(raw, dict):
        return [{"field": f"[{position}]", "message": "must be an object"}]
    problems = []
    portal_id = _integer(raw.get("portalId"))
    occurred_ms = _integer(raw.get("occurredAt"))
    subscription_type = raw.get("subscriptionType")
    if portal_id is None:
        problems.append({"field": f"[{position}].portalId", "message": "must be an integer"})
    if occurred_ms is None or not 0 <= occurred_ms <= 10**14:
        problems.append({"field": f"[{position}].occurredAt", "message": "must be epoch ms"})
    if not isinstance(subscription_type, str) or not 0 < len(subscription_type) <= 64:
        problems.append(
            {"field": f"[{position}].subscriptionType", "message": "must be a short string"}
        )
    if problems:
        return problems
    assert portal_id is not None
    assert occurred_ms is not None
    assert isinstance(subscription_type, str)
    # Everything that identifies the change, never attemptNumber (it grows on each retry).
    identity: list[Any] = [
        portal_id,
        subscription_type,
        raw.get("objectId"),
        occurred_ms,
        raw.get("eventId"),
    ]
    if subscription_type.endswith(".propertyChange"):
        identity += [raw.get("propertyName"), raw.get("propertyValue")]
    return HubSpotEvent(
        portal_id=portal_id,
        app_id=str(raw.get("appId", "")),
        subscription_type=subscription_type,
        occurred_at=datetime.fromtimestamp(occurred_ms / 1000, UTC),
        idempotency_key=json.dumps(identity, separators=(",", ":"), default=str),
        raw=raw,
    )


def parse_hubspot_batch(data: Any) -> tuple[list[HubSpotEvent], list[dict[str, str]]]:
    """A HubSpot webhook body's events, and the problems of those that cannot be read."""
    if not isinstance(data, list):
        return [], [{"field": "", "message": "must be a JSON array of events"}]
    if len(data) > MAX_HUBSPOT_EVENTS:
        return [], [{"field": "", "message": f"at most {MAX_HUBSPOT_EVENTS} events"}]
    events: list[HubSpotEvent] = []
    problems: list[dict[str, str]] = []
    for position, raw in enumerate(data):
        parsed = parse_hubspot_event(raw, position)
        if isinstance(parsed, HubSpotEvent):
            events.append(parsed)
        else:
            problems.extend(parsed)
    return events, problems


@dataclass
class IntakeCounts:
    stored: int = 0
    duplicates: int = 0
    ignored: int = 0


async def store_hubspot_events(
    events: list[HubSpotEvent], *, session: AsyncSession, cipher: TokenCipher, app_id: str
) -> IntakeCounts:
    """Enqueue the events of installed portals (parked while a portal needs re-authorization).

    Only the contact subscriptions Hubline handles are stored: the worker picks a handler
    by type, and an event signed with the client secret naming one of Hubline's own types
    (`app.uninstall`, `properties.provision`, ...) would otherwise run its handler.

    A privacy deletion is stored for any portal Hubline knows, uninstalled or waiting for
    re-consent: it needs no HubSpot call, and the caller details it erases are kept (in
    parked events) until then. HubSpot still sends it where the app stays installed on
    its side (a revoked grant, a disconnect forced here).
    """
    counts = IntakeCounts()
    # An id past BIGINT names no portal (and the database could not compare it): ignored.
    portal_ids = {event.portal_id for event in events if fits_bigint(event.portal_id)}
    found = await session.execute(
        sa.select(col(Portal.portal_id), col(Portal.status)).where(
            col(Portal.portal_id).in_(portal_ids)
        )
    )
    statuses = dict(found.all())
    for event in events:
        status = statuses.get(event.portal_id)
        erasure = event.subscription_type == PRIVACY_DELETION
        # HubSpot retries every 4xx for a day: what is not ours is acknowledged and dropped.
        unserved = status is None or (status == PortalStatus.uninstalled and not erasure)
        unused = event.subscription_type not in CONTACT_EVENT_TYPES
        if unserved or unused or (app_id and event.app_id != app_id):
            counts.ignored += 1
            continue
        enqueued = await enqueue(
            NewEvent(
                portal_id=event.portal_id,
                source=EventSource.hubspot,
                type=event.subscription_type,
                idempotency_key=event.idempotency_key,
                occurred_at=event.occurred_at,
                payload=event.raw,
            ),
            session=session,
            cipher=cipher,
            status=EventStatus.parked
            if status == PortalStatus.needs_reauth and not erasure
            else EventStatus.pending,
        )
        if enqueued.created:
            counts.stored += 1
        else:
            counts.duplicates += 1
    return counts


def hubspot_endpoint(clock: Clock = time.time) -> Endpoint:
    """`POST /webhooks/hubspot`; `clock` (epoch seconds) is what the signature window uses."""

    async def hubspot_webhook(request: Request) -> Response:
        """HubSpot's app webhook: a signed JSON array of events for any installed portal."""
        resources = services(request)
        settings = resources.settings
        try:
            body = await read_body(request)
        except BodyTooLarge:
            return _too_large()
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        url = hubspot_signed_url(settings.public_url, raw_path.decode("latin-1"), request.url.query)
        if not verify_hubspot_v3(
            secret=settings.hubspot_client_secret.get_secret_value(),
            method=request.method,
            url=url,
            body=body,
            signature=request.headers.get("x-hubspot-signature-v3"),
            timestamp=request.headers.get("x-hubspot-request-timestamp"),
            now=clock(),
        ):
            return error_response(401, "invalid_signature", "X-HubSpot-Signature-v3 check failed")
        parsed, data = _parse_json(body)
        if not parsed:
            return error_response(400, "malformed_json", "the body is not JSON")
        events, problems = parse_hubspot_batch(data)
        if problems and not events:
            return error_response(400, "malformed_events", problems)
        try:
            async with transaction(resources.sessions) as session:
                counts = await store_hubspot_events(
                    events, session=session, cipher=resources.cipher, app_id=settings.hubspot_app_id
                )
        except DATABASE_ERRORS as error:
            return database_unavailable(error)
        unreadable = len(data) - len(events)
        log.info(
            "hubspot webhook: %d stored, %d duplicates, %d ignored, %d unreadable",
            counts.stored,
            counts.duplicates,
            counts.ignored,
            unreadable,
        )
        answer: dict[str, Any] = {
            "stored": counts.stored,
            "duplicates": counts.duplicates,
            "ignored": counts.ignored,
        }
        if problems:
            # HubSpot retries a refused batch for a day and then drops it: refused for an
            # event it cannot read, its readable events would be lost with it. They are
            # stored; what cannot be read is told, and dropped (it is refused every time).
            answer |= {"unreadable": unreadable, "problems": problems}
        return JSONResponse(answer)

    return hubspot_webhook


# --- receptionist ---------------------------------------------------------------------


@dataclass(frozen=True)
class _PortalAuth:
    portal: KnownPortal
    accepts: bool


async def _check_portal(
    resources: Services, portal_id: int, body: bytes, headers: Mapping[str, str]
) -> _PortalAuth | None:
    portal, remembered = await resources.portals.get(portal_id)
    if portal is None:
        return None
    accepts = authenticate_receptionist(body, headers, portal.secrets)
    if not accepts and remembered:
        # The secret may have been rotated since it was read: check against the database
        # before refusing, so a new secret works at once.
        portal = await resources.portals.reload(portal_id)
        if portal is None:
            return None
        accepts = authenticate_receptionist(body, headers, portal.secrets)
    return _PortalAuth(portal, accepts)


async def receptionist_webhook(request: Request) -> Response:
    """One receptionist event for a portal, authenticated with the portal's secret."""
    resources = services(request)
    try:
        body = await read_body(request)
    except BodyTooLarge:
        return _too_large()
    # A portal id is a BIGINT: anything else names no portal (and never reaches the database).
    portal_id = portal_of_path(request)
    if portal_id is None:
        return error_response(404, "unknown_portal", None)
    try:
        checked = await _check_portal(resources, portal_id, body, request.headers)
    except DATABASE_ERRORS as error:
        return database_unavailable(error)
    if checked is None:
        return error_response(404, "unknown_portal", None)
    if not checked.accepts:
        if signed_outside_window(body, request.headers, checked.portal.secrets):
            return error_response(401, "unauthorized", STALE_TIMESTAMP)
        return error_response(
            401, "unauthorized", "sign with Standard Webhooks or send Authorization: Bearer"
        )
    parsed, data = _parse_json(body)
    if not parsed:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()[:40]
        if encoding not in ("", "identity"):
            # DESIGN.md's 400 for a body that is not JSON, saying why it is not.
            detail = f"the body is not JSON: it is {encoding}-encoded; send it uncompressed"
            return error_response(400, "malformed_json", detail)
        return error_response(400, "malformed_json", "the body is not JSON")
    received_at = utcnow()
    portal = checked.portal
    try:
        event = parse_event(
            data,
            webhook_id=request.headers.get("webhook-id"),
            region=portal.default_phone_region or resources.settings.default_phone_region,
            received_at=received_at,
        )
    except EventRejected as rejected:
        return error_response(422, "invalid_event", rejected.problems)
    if portal.status != PortalStatus.active:
        # The cached status may predate a reinstall (made in another process), whose
        # un-parking would then never see this event: park only on the database's word.
        try:
            portal = await resources.portals.reload(portal_id) or portal
        except DATABASE_ERRORS as error:
            return database_unavailable(error)
    # An uninstalled portal's events wait, parked, for a reinstall; so do those of a
    # portal whose authorization lapsed, until it is renewed.
    status = EventStatus.pending if portal.status == PortalStatus.active else EventStatus.parked
    try:
        enqueued = await resources.inbox_writer.store(
            NewEvent(
                portal_id=portal_id,
                source=EventSource.receptionist,
                type=event.type,
                idempotency_key=event.id,
                occurred_at=event.occurred_at,
                payload=event.payload(),
            ),
            status=status,
        )
    except DATABASE_ERRORS as error:
        return database_unavailable(error)
    answer: dict[str, Any] = {
        "status": "accepted" if enqueued.created else "duplicate",
        "event_id": enqueued.event_id,
    }
    if event.ignored:
        answer["ignored"] = event.ignored
    return JSONResponse(answer, status_code=202 if enqueued.created else 200)


routes: list[BaseRoute] = [
    Route("/webhooks/hubspot", counted("hubspot", hubspot_endpoint()), methods=["POST"]),
    Route(
        "/webhooks/portals/{portal_id}/receptionist",
        counted("receptionist", receptionist_webhook),
        methods=["POST"],
    ),
]
