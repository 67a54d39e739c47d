"""Marketing events and attendance (subscriber states)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from app.sandbox import objects
from app.sandbox.errors import conflict, not_found, validation_error
from app.sandbox.gateway import ApiContext, api_route, batch_answer, json_response, read_json
from app.sandbox.properties import EMAIL_RE
from app.sandbox.state import Attendance, MarketingEvent, PortalWorld

READ = ("crm.objects.marketing_events.read", "crm.objects.marketing_events.write")
WRITE = "crm.objects.marketing_events.write"
REQUIRED = ("externalEventId", "externalAccountId", "eventName", "eventOrganizer")
OPTIONAL = (
    "eventType",
    "startDateTime",
    "endDateTime",
    "eventDescription",
    "eventUrl",
    "eventCancelled",
    "eventCompleted",
    "customProperties",
)
STATES = {
    "register": "REGISTERED",
    "registered": "REGISTERED",
    "attend": "ATTENDED",
    "attended": "ATTENDED",
    "cancel": "CANCELLED",
    "cancelled": "CANCELLED",
}


def _validate(body: dict[str, Any], *, partial: bool = False) -> None:
    missing = [] if partial else [k for k in REQUIRED if not body.get(k)]
    if missing:
        raise validation_error(f"Missing required fields: {', '.join(missing)}")


def _upsert(ctx: ApiContext, body: dict[str, Any], *, allow_update: bool) -> MarketingEvent:
    _validate(body)
    world = ctx.portal
    key = (str(body["externalEventId"]), str(body["externalAccountId"]))
    now = ctx.state.now()
    event = world.marketing_events.get(key)
    if event is not None and not allow_update:
        raise conflict(
            f"A marketing event with externalEventId {key[0]} and externalAccountId {key[1]} "
            "already exists."
        )
    if event is None:
        event = MarketingEvent(world.next_marketing_event_id(), key[0], key[1], "", "", now, now)
        world.marketing_events[key] = event
    _apply(event, body, now)
    return event


def _apply(event: MarketingEvent, body: dict[str, Any], now: float) -> None:
    if "eventName" in body:
        event.event_name = str(body["eventName"])
    if "eventOrganizer" in body:
        event.event_organizer = str(body["eventOrganizer"])
    event.details.update({k: body[k] for k in OPTIONAL if k in body})
    event.updated_at = now


def _find_event(world: PortalWorld, external_event_id: str, account: str | None) -> MarketingEvent:
    matches = [
        e
        for (event_id, account_id), e in world.marketing_events.items()
        if event_id == external_event_id and (account is None or account_id == account)
    ]
    if len(matches) != 1:
        raise not_found(f"Marketing event {external_event_id} was not found")
    return matches[0]


async def create_event(request: Request, ctx: ApiContext) -> Response:
    """POST /marketing/v3/marketing-events/events: 409 when the external ids already exist."""
    ctx.require_scope(WRITE)
    event = _upsert(ctx, await read_json(request), allow_update=False)
    return json_response(event.to_json())


async def upsert_event(request: Request, ctx: ApiContext) -> Response:
    """PUT /marketing/v3/marketing-events/events/{externalEventId}: create or update."""
    ctx.require_scope(WRITE)
    body = await read_json(request)
    body["externalEventId"] = request.path_params["external_event_id"]
    return json_response(_upsert(ctx, body, allow_update=True).to_json())


async def batch_upsert_events(request: Request, ctx: ApiContext) -> Response:
    """POST /marketing/v3/marketing-events/events/upsert."""
    ctx.require_scope(WRITE)
    inputs = (await read_json(request)).get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise validation_error("inputs must be a list of objects")
    for item in inputs:
        _validate(item)
    started = ctx.state.now()
    results = [_upsert(ctx, item, allow_update=True).to_json() for item in inputs]
    return json_response(batch_answer(started, results, ctx.state.now()))


async def get_event(request: Request, ctx: ApiContext) -> Response:
    """GET /marketing/v3/marketing-events/events/{externalEventId}?externalAccountId=..."""
    ctx.require_scope(*READ)
    event = _find_event(
        ctx.portal,
        request.path_params["external_event_id"],
        request.query_params.get("externalAccountId"),
    )
    return json_response(event.to_json())


async def patch_event(request: Request, ctx: ApiContext) -> Response:
    """PATCH /marketing/v3/marketing-events/events/{externalEventId}?externalAccountId=..."""
    ctx.require_scope(WRITE)
    event = _find_event(
        ctx.portal,
        request.path_params["external_event_id"],
        request.query_params.get("externalAccountId"),
    )
    _apply(event, await read_json(request), ctx.state.now())
    return json_response(event.to_json())


async def delete_event(request: Request, ctx: ApiContext) -> Response:
    """DELETE /marketing/v3/marketing-events/events/{externalEventId}?externalAccountId=..."""
    ctx.require_scope(WRITE)
    event = _find_event(
        ctx.portal,
        request.path_params["external_event_id"],
        request.query_params.get("externalAccountId"),
    )
    del ctx.portal.marketing_events[(event.external_event_id, event.external_account_id)]
    return Response(status_code=204)


def _state_name(raw: str) -> str:
    name = STATES.get(raw.lower())
    if name is None:
        raise validation_error(f"Unknown subscriber state {raw!r}: use register, attend or cancel")
    return name


def _event_for(request: Request, ctx: ApiContext) -> MarketingEvent:
    if "object_id" in request.path_params:
        wanted = request.path_params["object_id"]
        found = [e for e in ctx.portal.marketing_events.values() if e.object_id == wanted]
        if not found:
            raise not_found(f"Marketing event {wanted} was not found")
        return found[0]
    return _find_event(
        ctx.portal,
        request.path_params["external_event_id"],
        request.query_params.get("externalAccountId"),
    )


def _interaction(item: dict[str, Any], now: float) -> int:
    raw = item.get("interactionDateTime")
    if raw is None:
        return int(now * 1000)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise validation_error("interactionDateTime must be epoch milliseconds") from None


async def attendance_by_email(request: Request, ctx: ApiContext) -> Response:
    """POST .../attendance/{state}/email-create: contacts missing by email are created."""
    ctx.require_scope(WRITE)
    event = _event_for(request, ctx)
    state_name = _state_name(request.path_params["subscriber_state"])
    inputs = (await read_json(request)).get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise validation_error("inputs must be a list of objects")
    world = ctx.portal
    # Validate every input (new contacts included) before writing anything.
    pending: set[str] = set()
    plan: list[tuple[int, str, objects.PreparedCreate | None]] = []
    started = ctx.state.now()
    for item in inputs:
        email = str(item.get("email", "")).strip().lower()
        if not EMAIL_RE.match(email):
            raise validation_error(f"Email address {item.get('email')!r} is invalid")
        prepared = None
        if world.find_by_email(email) is None and email not in pending:
            properties = {**(item.get("contactProperties") or {}), "email": email}
            prepared = objects.prepare_create(
                world, "contacts", {"properties": properties}, pending_emails=pending
            )
        plan.append((_interaction(item, started), email, prepared))
    results: list[dict[str, Any]] = []
    for interaction_at, email, prepared in plan:
        if prepared is not None:
            contact = objects.commit_create(
                ctx.state, world, "contacts", prepared, ctx.state.api_source()
            )
        else:
            found = world.find_by_email(email)
            assert found is not None  # created by an earlier input or already there
            contact = found
        _record(ctx, event, contact.id, state_name, interaction_at)
        results.append({"email": email, "vid": int(contact.id)})
    return json_response(batch_answer(started, results, ctx.state.now()))


async def attendance_by_id(request: Request, ctx: ApiContext) -> Response:
    """POST .../attendance/{state}/create: contacts by id (`vid`); unknown ids are errors."""
    ctx.require_scope(WRITE)
    event = _event_for(request, ctx)
    state_name = _state_name(request.path_params["subscriber_state"])
    inputs = (await read_json(request)).get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise validation_error("inputs must be a list of objects")
    started = ctx.state.now()
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    for item in inputs:
        contact = ctx.portal.get("contacts", str(item.get("vid", "")))
        if contact is None:
            missing.append(str(item.get("vid")))
            continue
        _record(ctx, event, contact.id, state_name, _interaction(item, started))
        results.append({"vid": int(contact.id)})
    errors = [
        {
            "status": "error",
            "category": "OBJECT_NOT_FOUND",
            "message": "Some contacts were not found",
            "context": {"ids": missing},
        }
    ]
    body = batch_answer(started, results, ctx.state.now(), errors if missing else None)
    return json_response(body, 207 if missing else 200)


def _record(
    ctx: ApiContext, event: MarketingEvent, contact_id: str, state_name: str, at: int
) -> None:
    ctx.portal.attendance.append(
        Attendance(
            event.external_event_id,
            event.external_account_id,
            contact_id,
            state_name,
            at,
            ctx.state.now(),
        )
    )


def routes() -> list[BaseRoute]:
    """The marketing events routes."""
    base = "/marketing/v3/marketing-events"
    return [
        api_route(f"{base}/events", create_event, methods=["POST"]),
        api_route(f"{base}/events/upsert", batch_upsert_events, methods=["POST"]),
        api_route(f"{base}/events/{{external_event_id}}", get_event, methods=["GET"]),
        api_route(f"{base}/events/{{external_event_id}}", upsert_event, methods=["PUT"]),
        api_route(f"{base}/events/{{external_event_id}}", patch_event, methods=["PATCH"]),
        api_route(f"{base}/events/{{external_event_id}}", delete_event, methods=["DELETE"]),
        api_route(
            f"{base}/attendance/{{external_event_id}}/{{subscriber_state}}/email-create",
            attendance_by_email,
            methods=["POST"],
        ),
        api_route(
            f"{base}/attendance/{{external_event_id}}/{{subscriber_state}}/create",
            attendance_by_id,
            methods=["POST"],
        ),
        api_route(
            f"{base}/{{object_id}}/attendance/{{subscriber_state}}/email-create",
            attendance_by_email,
            methods=["POST"],
        ),
        api_route(
            f"{base}/{{object_id}}/attendance/{{subscriber_state}}/create",
            attendance_by_id,
            methods=["POST"],
        ),
    ]
