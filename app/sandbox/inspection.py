"""Inspection and control endpoints under /_sandbox/ (JSON, no auth): state, traffic, tokens,
faults, forced expiry, uninstall, reset and runtime settings."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from app.sandbox.limits import Fault
from app.sandbox.state import PortalWorld, SandboxState

# Settings that may change at runtime, with the types they accept.
SETTINGS: dict[str, tuple[type, ...]] = {
    "latency_seconds": (int, float),
    "search_lag_seconds": (int, float),
    "requests_per_10s": (int, type(None)),
    "searches_per_second": (int, type(None)),
    "send_retry_after": (bool,),
    "webhook_target_url": (str, type(None)),
    "webhook_properties": (list, type(None)),
    "webhook_batch_delay": (int, float),
    "webhook_timeout": (int, float),
    "webhook_max_retries": (int,),
    "webhook_retry_base_delay": (int, float),
    "webhook_retry_max_delay": (int, float),
    "access_token_lifetime": (int, float),
    "code_lifetime": (int, float),
    "rotate_refresh_tokens": (bool,),
    "journal_url_lifetime": (int, float),
    "journal_entries_listed": (bool,),
    "public_url": (str,),
}


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


def _world(request: Request) -> PortalWorld | Response:
    state = _state(request)
    try:
        return state.portals[int(request.path_params["portal_id"])]
    except (KeyError, ValueError):
        return JSONResponse({"error": "unknown portal"}, status_code=404)


async def _body(request: Request) -> dict[str, Any] | Response:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError:
        return JSONResponse({"error": "invalid JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "expected a JSON object"}, status_code=400)
    return body


def portal_summary(state: SandboxState, world: PortalWorld) -> dict[str, Any]:
    """A portal's status in a few numbers."""
    return {
        "portal_id": world.portal_id,
        "hub_domain": world.portal.hub_domain,
        "name": world.portal.display_name,
        "installed": world.installed,
        "granted_scopes": world.granted_scopes,
        "tier_scopes": sorted(world.portal.scopes),
        "contacts": len(world.live("contacts")),
        "calls": len(world.live("calls")),
        "notes": len(world.live("notes")),
        "refresh_count": state.refresh_count[world.portal_id],
        "exchange_count": state.exchange_count[world.portal_id],
    }


def portal_detail(state: SandboxState, world: PortalWorld) -> dict[str, Any]:
    """Everything in a portal."""
    return {
        **portal_summary(state, world),
        "installed_at": world.installed_at,
        "uninstalled_at": world.uninstalled_at,
        "objects": {
            object_type: [
                {"id": o.id, "properties": dict(o.properties), "archived": o.archived}
                for o in records.values()
            ]
            for object_type, records in world.objects.items()
        },
        "merged_into": dict(world.merged_into),
        "associations": [
            {
                "from_type": a.from_type,
                "from_id": a.from_id,
                "to_type": a.to_type,
                "to_id": a.to_id,
                "type_id": a.type_id,
            }
            for a in sorted(
                world.associations,
                key=lambda a: (a.from_type, int(a.from_id), a.to_type, int(a.to_id)),
            )
        ],
        "properties": {
            object_type: [p.to_json() for p in defs.values() if not p.hubspot_defined]
            for object_type, defs in world.properties.items()
        },
        "property_groups": {
            object_type: [g.to_json() for g in groups.values()]
            for object_type, groups in world.groups.items()
        },
        "marketing_events": [e.to_json() for e in world.marketing_events.values()],
        "attendance": [a.to_json() for a in world.attendance],
    }


async def overview(request: Request) -> Response:
    """GET /_sandbox/state."""
    state = _state(request)
    return JSONResponse(
        {
            "portals": [portal_summary(state, w) for w in state.portals.values()],
            "settings": _settings(state),
        }
    )


async def portal(request: Request) -> Response:
    """GET /_sandbox/portals/{portal_id}."""
    world = _world(request)
    if isinstance(world, Response):
        return world
    return JSONResponse(portal_detail(_state(request), world))


async def requests(request: Request) -> Response:
    """GET /_sandbox/requests?portal_id=&limit=: recent traffic and counts."""
    state = _state(request)
    wanted = request.query_params.get("portal_id")
    portal_id = int(wanted) if wanted else None
    limit = int(request.query_params.get("limit", "200"))
    log = [r for r in state.request_log if portal_id is None or r.portal_id == portal_id]
    # Requests no portal's token made (an OAuth exchange) count under portal None.
    selected = sorted(
        (
            (key, n)
            for key, n in state.request_counts.items()
            if portal_id is None or key[0] == portal_id
        ),
        key=lambda item: (item[0][0] is not None, item[0][0] or 0, item[0][1], item[0][2]),
    )
    counts = [{"portal_id": p, "endpoint": e, "status": s, "count": n} for (p, e, s), n in selected]
    by_status: Counter[int] = Counter()
    for (_, _, status), n in selected:
        by_status[status] += n
    return JSONResponse(
        {
            "requests": [r.to_json() for r in log[-limit:]],
            "counts": counts,
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
        }
    )


async def tokens(request: Request) -> Response:
    """GET /_sandbox/tokens: every token issued, in plaintext, for leak scans."""
    state = _state(request)
    return JSONResponse(
        {
            "access_tokens": [
                {
                    "token": t.token,
                    "portal_id": t.portal_id,
                    "scopes": t.scopes,
                    "expires_at": t.expires_at,
                    "revoked": t.revoked,
                }
                for t in state.access_tokens.values()
            ],
            "refresh_tokens": [
                {"token": t.token, "portal_id": t.portal_id, "revoked": t.revoked}
                for t in state.refresh_tokens.values()
            ],
            "codes": [
                {"code": c.code, "portal_id": c.portal_id, "used": c.used}
                for c in state.codes.values()
            ],
            "secrets": state.issued_secrets(),
        }
    )


async def counts(request: Request) -> Response:
    """GET /_sandbox/counts: code exchanges and refreshes per portal."""
    state = _state(request)
    return JSONResponse(
        {
            "refresh": {str(k): v for k, v in state.refresh_count.items()},
            "exchange": {str(k): v for k, v in state.exchange_count.items()},
        }
    )


async def reset(request: Request) -> Response:
    """POST /_sandbox/reset: forget everything."""
    _state(request).reset()
    return JSONResponse({"reset": True})


async def faults(request: Request) -> Response:
    """GET, POST or DELETE /_sandbox/faults."""
    state = _state(request)
    if request.method == "DELETE":
        state.faults.clear()
    elif request.method == "POST":
        body = await _body(request)
        if isinstance(body, Response):
            return body
        try:
            fault = Fault(
                count=int(body.get("count", 1)),
                status=int(body.get("status", 504 if body.get("hang_seconds") else 503)),
                hang_seconds=float(body.get("hang_seconds") or 0.0),
                portal_id=int(body["portal_id"]) if body.get("portal_id") is not None else None,
                path_prefix=str(body["path_prefix"]) if body.get("path_prefix") else None,
                probability=float(body.get("probability", 1.0)),
            )
        except (TypeError, ValueError):
            return JSONResponse(
                {"error": "count, status, hang_seconds, portal_id, probability are numbers"},
                status_code=400,
            )
        state.faults.append(fault)
    return JSONResponse({"faults": [f.to_json() for f in state.faults]})


async def expire_tokens(request: Request) -> Response:
    """POST /_sandbox/portals/{portal_id}/expire-tokens."""
    world = _world(request)
    if isinstance(world, Response):
        return world
    return JSONResponse({"expired": _state(request).expire_portal_tokens(world.portal_id)})


async def uninstall(request: Request) -> Response:
    """POST /_sandbox/portals/{portal_id}/uninstall: the portal's admin uninstalls the app."""
    world = _world(request)
    if isinstance(world, Response):
        return world
    _state(request).uninstall(world.portal_id)
    return JSONResponse(portal_summary(_state(request), world))


def _settings(state: SandboxState) -> dict[str, Any]:
    # With the app's identity, read-only: what a Hubline beside it must be configured with.
    identity = {"client_id": state.config.client_id, "app_id": state.config.app_id}
    return {name: getattr(state.config, name) for name in SETTINGS} | identity


async def settings(request: Request) -> Response:
    """GET or POST /_sandbox/settings: change latency, search lag, limits and more at runtime."""
    state = _state(request)
    if request.method == "POST":
        body = await _body(request)
        if isinstance(body, Response):
            return body
        unknown = sorted(set(body) - set(SETTINGS))
        wrong = sorted(
            k
            for k, v in body.items()
            if k in SETTINGS
            and (
                not isinstance(v, SETTINGS[k])
                or (isinstance(v, bool) and bool not in SETTINGS[k])
                or (isinstance(v, list) and not all(isinstance(item, str) for item in v))
            )
        )
        if unknown or wrong:
            return JSONResponse(
                {"error": "bad settings", "unknown": unknown, "wrong_type": wrong}, status_code=400
            )
        for name, value in body.items():
            setattr(state.config, name, value)
    return JSONResponse(_settings(state))


async def webhooks(request: Request) -> Response:
    """GET /_sandbox/webhooks: events emitted, deliveries attempted, events queued."""
    state = _state(request)
    return JSONResponse(
        {
            "events": list(state.webhook_events),
            "deliveries": [d.to_json() for d in state.webhook_deliveries],
            "pending": len(state.webhook_outbox),
        }
    )


async def journal(request: Request) -> Response:
    """GET /_sandbox/journal: the retained journal entries."""
    return JSONResponse({"entries": [e.to_json() for e in _state(request).live_journal()]})


def routes() -> list[BaseRoute]:
    """The /_sandbox routes."""
    return [
        Route("/_sandbox/state", overview, methods=["GET"]),
        Route("/_sandbox/portals/{portal_id}", portal, methods=["GET"]),
        Route("/_sandbox/portals/{portal_id}/expire-tokens", expire_tokens, methods=["POST"]),
        Route("/_sandbox/portals/{portal_id}/uninstall", uninstall, methods=["POST"]),
        Route("/_sandbox/requests", requests, methods=["GET"]),
        Route("/_sandbox/tokens", tokens, methods=["GET"]),
        Route("/_sandbox/counts", counts, methods=["GET"]),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sandbox/settings", settings, methods=["GET", "POST"]),
        Route("/_sandbox/webhooks", webhooks, methods=["GET"]),
        Route("/_sandbox/journal", journal, methods=["GET"]),
    ]
