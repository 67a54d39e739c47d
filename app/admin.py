"""The operator's JSON API under /admin/api/, mirroring the console's pages and actions.

Every route needs `Authorization: Bearer ADMIN_TOKEN`, compared in constant time;
with ADMIN_TOKEN unset the whole console answers 404, as if it did not exist. A bearer
token is never sent by a browser on its own, so these routes need no CSRF token.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route

from app.console import (
    TOO_MANY_ATTEMPTS,
    check_bearer,
    portal_rows,
    recent_events,
    retry_failed,
    rotate_portal_secret,
)
from app.db import fits_bigint
from app.errors import HubSpotNotReached
from app.lifecycle import disconnect, portal_summaries
from app.main import Services, services
from app.middleware import portal_of_path
from app.models import utcnow
from app.properties import request_provisioning

NO_STORE = {"Cache-Control": "no-store"}


async def admin_denial(request: Request) -> Response | None:
    """The answer for a request without the admin token, or None when it carries it.

    Wrong tokens are slowed down exactly as on the console's sign-in form.
    """
    if not services(request).settings.admin_token.get_secret_value():
        return JSONResponse({"error": "not_found", "detail": None}, status_code=404)
    right = await check_bearer(request)
    if right is None:
        return JSONResponse(
            {"error": "too_many_attempts", "detail": TOO_MANY_ATTEMPTS}, status_code=429
        )
    if not right:
        return JSONResponse(
            {"error": "unauthorized", "detail": "send Authorization: Bearer <ADMIN_TOKEN>"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="hubline-admin"'},
        )
    return None


def _answer(body: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers=NO_STORE)


def _no_portal(given: str) -> JSONResponse:
    """404 for the portal id the path gives (shown cut short: it may be any text)."""
    shown = given if len(given) <= 24 else given[:24] + "…"
    return _answer({"error": "not_found", "detail": f"no portal {shown}"}, 404)


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def api_portals(request: Request) -> Response:
    """Every portal with its status, problems and (for needs_reauth) the re-consent link."""
    denial = await admin_denial(request)
    if denial is not None:
        return denial
    resources = services(request)
    async with resources.sessions() as session:
        portals = await portal_summaries(session=session, settings=resources.settings)
    return _answer(portals)


async def portal_detail(resources: Services, portal_id: int) -> dict[str, Any] | None:
    """One portal as the console's portal page shows it, as JSON (no secrets, no callers)."""
    async with resources.sessions() as session:
        summaries = await portal_summaries(
            session=session, settings=resources.settings, portal_id=portal_id
        )
    rows = await portal_rows(resources, portal_id=portal_id)
    if not summaries or not rows:
        return None
    row = rows[0]
    portal = row["portal"]
    events = []
    for item in await recent_events(resources, portal_id):
        event, engagement = item["event"], item["engagement"]
        events.append(
            {
                "id": event.id,
                "source": event.source,
                "type": event.type,
                "status": event.status,
                "attempts": event.attempts,
                "occurred_at": _when(event.occurred_at),
                "received_at": _when(event.received_at),
                "finished_at": _when(event.finished_at),
                "error": event.last_error,
                "contact_id": engagement.contact_id if engagement else event.contact_id,
                "contact_url": item["contact_url"],
                "engagement": {
                    "object_type": engagement.object_type,
                    "id": engagement.engagement_id,
                }
                if engagement
                else None,
            }
        )
    return {
        **summaries[0],
        "default_phone_region": portal.default_phone_region
        or resources.settings.default_phone_region,
        "token_expires_at": _when(row["token_expires_at"]),
        "last_sync": _when(row["last_sync"]),
        "pending": row["pending"],
        "failed_24h": row["failed_24h"],
        "attention": row["attention"],
        "events": events,
    }


async def api_portal(request: Request) -> Response:
    """One portal: status, counts, problems and its recent events with their outcomes."""
    denial = await admin_denial(request)
    if denial is not None:
        return denial
    portal_id = portal_of_path(request)
    detail = await portal_detail(services(request), portal_id) if portal_id is not None else None
    if detail is None:
        return _no_portal(request.path_params["portal_id"])
    return _answer(detail)


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The request's JSON object; {} for an empty body, None for anything else."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    # A body nested deeper than the parser's recursion limit is malformed too.
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _event_ids(data: dict[str, Any]) -> list[int] | str | None:
    """The ids to retry (None: all failed), or a message saying what is wrong."""
    if "event_id" in data:
        data = {"event_ids": [data["event_id"]]}
    ids = data.get("event_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        return "event_ids must be a list of integers"
    # An id beyond the column's range names no event: like any unknown id, it retries none.
    return [i for i in ids if fits_bigint(i)]


async def api_portal_action(request: Request) -> Response:
    """`retry` (one, some or all failed events), `rotate-secret`, `disconnect`, `provision`."""
    denial = await admin_denial(request)
    if denial is not None:
        return denial
    resources = services(request)
    portal_id = portal_of_path(request)
    action = request.path_params["action"]
    if action not in ACTIONS:
        return _answer({"error": "not_found", "detail": f"no action {action[:40]!r}"}, 404)
    if portal_id is None:
        return _no_portal(request.path_params["portal_id"])
    async with resources.sessions() as session:
        found = await portal_summaries(
            session=session, settings=resources.settings, portal_id=portal_id
        )
    if not found:
        return _no_portal(str(portal_id))
    data = await _json_body(request)
    if data is None:
        return _answer({"error": "malformed_json", "detail": "send a JSON object or nothing"}, 400)
    if action == "retry":
        ids = _event_ids(data)
        if isinstance(ids, str):
            return _answer(
                {"error": "invalid_request", "detail": [{"field": "event_ids", "message": ids}]},
                422,
            )
        return _answer({"retried": await retry_failed(resources, portal_id, ids)})
    if action == "rotate-secret":
        secret = await rotate_portal_secret(resources, portal_id)
        grace = timedelta(hours=resources.settings.secret_rotation_grace_hours)
        return _answer(
            {
                "secret": secret.reveal(),
                "previous_secret_valid_until": (utcnow() + grace).isoformat(),
            }
        )
    if action == "provision":
        await request_provisioning(resources, portal_id, key=f"admin-api:{uuid.uuid4()}")
        return _answer({"queued": True}, 202)
    try:
        outcome = await disconnect(resources, portal_id, force=data.get("force") is True)
    except HubSpotNotReached as error:
        return _answer({"error": "hubspot_unavailable", "detail": str(error)}, 503)
    return _answer(
        {
            "uninstall_event_id": outcome.event_id,
            "uninstalled_on_hubspot": outcome.uninstalled_on_hubspot,
            "revoked": outcome.revoked,
            "already_uninstalled": outcome.already_uninstalled,
        },
        200 if outcome.already_uninstalled else 202,
    )


ACTIONS = frozenset({"retry", "rotate-secret", "provision", "disconnect"})


async def api_unknown(request: Request) -> Response:
    """What no route above takes: 401 without the token, as the contract says of every
    API path; with it, 405 for a known path's wrong method, else 404."""
    denial = await admin_denial(request)
    if denial is not None:
        return denial
    for route in routes[:-1]:
        if isinstance(route, Route) and route.matches(request.scope)[0] is Match.PARTIAL:
            return JSONResponse(
                {"error": "method_not_allowed", "detail": None},
                status_code=405,
                headers={"Allow": ", ".join(sorted(route.methods or ()))},
            )
    return JSONResponse({"error": "not_found", "detail": None}, status_code=404)


routes: list[BaseRoute] = [
    Route("/admin/api/portals", api_portals, methods=["GET"]),
    # Ids are read by `portal_of_path`, not the `int` convertor: its int() raised on an id of
    # 4,300 digits, a 500 before any check (the receptionist route reads them so too).
    Route("/admin/api/portals/{portal_id}", api_portal, methods=["GET"]),
    Route("/admin/api/portals/{portal_id}/{action}", api_portal_action, methods=["POST"]),
    # Last: it takes what the routes above do not, a wrong method on them included.
    Route(
        "/admin/api/{rest:path}",
        api_unknown,
        methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
    ),
]
