"""The customer's settings page and its actions, behind the portal session the OAuth flow grants.

Only `/oauth/callback` issues the session: a signed, HttpOnly cookie naming one portal
and its install generation, valid for SESSION_LIFETIME. Every action also needs a CSRF
token derived from that cookie, so another site can neither read the page nor post its
forms. A session outlives neither its install (a reinstall or an uninstall ends it) nor
its half hour; without one, the answer says how to get back in: through HubSpot.

Actions: rotate the receptionist secret (the old one keeps working for
SECRET_ROTATION_GRACE_HOURS), send a signed `test.ping` through the real receptionist
route (in-process, through the whole app: middleware, signature check, inbox), and set
the portal's default phone region.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import phonenumbers
import sqlalchemy as sa
from sqlmodel import col
from standardwebhooks.webhooks import Webhook
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from app.crypto import same_text
from app.db import UNREACHABLE, transaction
from app.errors import read_error_text
from app.lifecycle import NEEDS_REAUTH_PROBLEM, install_url, reauth_url, webhook_url
from app.logs import request_id_var
from app.main import Services, services
from app.models import (
    EventSource,
    EventStatus,
    InboxEvent,
    Portal,
    PortalStatus,
    failed_status,
    utcnow,
)
from app.portals import current_secret, list_problems, rotate_secret
from app.receptionist import PING
from app.settings import Settings, region_code

log = logging.getLogger(__name__)

templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")

SESSION_COOKIE = "hubline_portal"
SESSION_LIFETIME = timedelta(minutes=30)
NO_STORE = {"Cache-Control": "no-store"}
RECENT_FAILURES = 5
RECENT_WINDOW = timedelta(days=7)
REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)


# --- the portal session --------------------------------------------------------------------


def _mac(resources: Services, purpose: str, payload: str) -> str:
    key = resources.cipher.derive_key(purpose)
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def cookie_name(settings: Settings, name: str) -> str:
    """The cookie `name`, as `__Host-<name>` when Hubline is served over https.

    Browsers take a `__Host-` cookie only from this very host, over https, for the whole
    site: a page on a sibling subdomain (or a forged plain-http answer) cannot plant one.
    A planted install binding or settings session would open, in this browser, an install
    someone else approved for their own account: a receptionist set up from that page
    would send its callers to their CRM.
    """
    return f"__Host-{name}" if settings.served_over_https else name


def sign_portal_session(resources: Services, portal_id: int, install_generation: int) -> str:
    """A short-lived cookie value scoped to one portal's settings actions."""
    expires = int(time.time() + SESSION_LIFETIME.total_seconds())
    payload = f"{portal_id}.{install_generation}.{expires}"
    return f"{payload}.{_mac(resources, 'portal-session', payload)}"


def read_portal_session(request: Request, resources: Services) -> tuple[int, int] | None:
    """(portal id, install generation) of a valid, unexpired session cookie, else None."""
    value = request.cookies.get(cookie_name(resources.settings, SESSION_COOKIE)) or ""
    payload, _, mac = value.rpartition(".")
    parts = payload.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return None
    if not same_text(mac, _mac(resources, "portal-session", payload)):
        return None
    portal_id, generation, expires = (int(part) for part in parts)
    if expires < time.time():
        return None
    return portal_id, generation


def csrf_token(resources: Services, session_value: str) -> str:
    """The token every settings form carries: bound to this browser's session cookie."""
    return _mac(resources, "portal-csrf", session_value)


def set_session_cookie(response: Response, resources: Services, value: str) -> None:
    response.set_cookie(
        cookie_name(resources.settings, SESSION_COOKIE),
        value,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path="/",
        secure=resources.settings.served_over_https,
        httponly=True,
        samesite="lax",
    )


# --- pages ---------------------------------------------------------------------------------


def error_page(
    request: Request,
    *,
    status_code: int,
    title: str,
    message: str,
    reason: str,
    action_url: str | None = None,
    action_label: str = "Start the install again",
) -> Response:
    """A page that says what happened and what to do next (never cached)."""
    # Without an action of its own, the page's action starts an install, at PUBLIC_URL.
    if action_url is None:
        action_url = install_url(services(request).settings)
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "title": title,
            "message": message,
            "reason": reason,
            "action_url": action_url,
            "action_label": action_label,
        },
        status_code=status_code,
        headers=NO_STORE,
    )


def _signed_out(request: Request, *, status_code: int, reason: str, message: str) -> Response:
    return error_page(
        request,
        status_code=status_code,
        title="Sign in through HubSpot to manage Hubline",
        message=message
        + " To manage your settings, install Hubline again from HubSpot (or click the button"
        " below): HubSpot confirms you administer the account, nothing is reset, and you"
        " come back to this page.",
        reason=reason,
        action_label="Manage my installation",
    )


def describe_duration(hours: float) -> str:
    """`24 hours`, `30 minutes`, `2 seconds`: how long a rotated secret keeps working."""
    seconds = round(hours * 3600)
    if seconds >= 7200 or (seconds and seconds % 3600 == 0):
        count, unit = round(seconds / 3600), "hour"
    elif seconds >= 120 or (seconds and seconds % 60 == 0):
        count, unit = round(seconds / 60), "minute"
    else:
        count, unit = seconds, "second"
    return f"{count} {unit}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong, in words a portal admin understands, and what to do about it."""

    kind: str
    message: str


def _problem_kind(code: str, message: str) -> str:
    if code == NEEDS_REAUTH_PROBLEM or code.startswith("properties:") or "scope" in message:
        return "Missing permission"
    if code.startswith("property:"):
        return "Property clash"
    return "Problem"


async def _problems(resources: Services, portal_id: int) -> list[Problem]:
    """The portal's standing problems, then its recent events that did not sync."""
    since = utcnow() - RECENT_WINDOW
    async with resources.sessions() as session:
        standing = await list_problems(portal_id, session=session)
        failed = (
            await session.execute(
                sa.select(InboxEvent)
                .where(
                    col(InboxEvent.portal_id) == portal_id,
                    col(InboxEvent.source) == EventSource.receptionist,
                    failed_status(),
                    col(InboxEvent.received_at) >= since,
                    # Implied (an event fails after it arrives), and what ix_events_failed
                    # reads by: the portal's failures of the window, not all it ever had.
                    col(InboxEvent.finished_at) >= since,
                )
                .order_by(col(InboxEvent.id).desc())
                .limit(RECENT_FAILURES)
            )
        ).scalars()
        problems = [Problem(_problem_kind(p.code, p.message), p.message) for p in standing]
        for event in failed:
            when = event.received_at.strftime("%Y-%m-%d %H:%M UTC")
            kind, reason = _failure_in_words(event.last_error or "no reason was given")
            problems.append(Problem(kind, f"An event received {when} was not synced: {reason}"))
    return problems


# "POST /crm/v3/objects/contacts/search: ", before a HubSpot error's words.
_REQUEST_PREFIX = re.compile(r"^[A-Z]+ /\S*: ")


def _failure_in_words(error: str) -> tuple[str, str]:
    """A failed event's kind and reason as its portal's admin reads them."""
    words, fields = read_error_text(error)
    # Which request HubSpot answered, the portal and the correlation id are the
    # operator's (the console and `hubline events list` show them), not the owner's.
    words = _REQUEST_PREFIX.sub("", words)
    status = fields.get("status", "")
    if status:
        answered = ", ".join(fields[name] for name in ("status", "category") if name in fields)
        words += f" (status {answered})"
    refused = status.startswith("4") or words.startswith("HubSpot rejected")
    return ("HubSpot rejection" if refused else "Not synced"), words


STATUS_WORDS = {
    PortalStatus.active: "Connected: events sync to your CRM within seconds.",
    PortalStatus.needs_reauth: "Paused: Hubline needs you to approve it again.",
    PortalStatus.uninstalled: "Uninstalled: nothing syncs.",
}


async def render_settings(
    request: Request,
    resources: Services,
    *,
    portal_id: int,
    session_value: str,
    notice: str = "",
    error: str = "",
    test_event: dict[str, Any] | None = None,
    done: str | None = None,
    reinstall: bool = False,
    return_url: str | None = None,
    status_code: int = 200,
) -> Response:
    """The settings page for the portal this browser's session names; `done` says what an
    action just did (see `_after`)."""
    settings = resources.settings
    async with resources.sessions() as session:
        portal = await session.get(Portal, portal_id)
        secret = await current_secret(portal_id, session=session, cipher=resources.cipher)
        # The newest event the worker took up is on the portal; what still waits for it
        # (a backlog, a portal that cannot be served) is read through its status, so
        # neither reads all the events the portal ever had.
        # A status at a time: given a list, a planner with statistics may read the
        # portal's receptionist events by source (all of them) instead.
        seen = [portal.last_event_at if portal is not None else None]
        for status in (EventStatus.pending, EventStatus.in_progress, EventStatus.parked):
            waiting = await session.execute(
                sa.select(sa.func.max(col(InboxEvent.received_at))).where(
                    col(InboxEvent.portal_id) == portal_id,
                    col(InboxEvent.status) == status,
                    col(InboxEvent.source) == EventSource.receptionist,
                    # The owner asks whether the receptionist itself is connected.
                    col(InboxEvent.type) != PING,
                )
            )
            seen.append(waiting.scalar_one_or_none())
        last_event = max((when for when in seen if when is not None), default=None)
    if portal is None or secret is None:
        return _signed_out(
            request, status_code=403, reason="unknown_portal", message="This installation is gone."
        )
    region = portal.default_phone_region or settings.default_phone_region
    grace = describe_duration(settings.secret_rotation_grace_hours)
    if done == DONE_ROTATED:
        notice = (
            "Your signing secret was changed. Paste the new one below into your "
            f"receptionist's settings; the old one keeps working for {grace}."
        )
    elif done == DONE_REGION:
        notice = f"Phone numbers without a country code are now read as {region} numbers."
    context: dict[str, Any] = {
        "portal_id": portal_id,
        "hub_domain": portal.hub_domain,
        "status": portal.status,
        "status_words": STATUS_WORDS.get(PortalStatus(portal.status), ""),
        "needs_reauth": portal.status == PortalStatus.needs_reauth,
        "reauth_url": reauth_url(settings),
        "reinstall": reinstall,
        "webhook_url": webhook_url(settings, portal_id),
        "webhook_secret": secret.reveal(),
        "rotated": done == DONE_ROTATED,
        "grace": grace,
        "problems": await _problems(resources, portal_id),
        "last_event_at": last_event,
        "region": region,
        "region_overridden": portal.default_phone_region is not None,
        "default_region": settings.default_phone_region,
        "regions": [(r, phonenumbers.country_code_for_region(r)) for r in REGIONS],
        "csrf": csrf_token(resources, session_value),
        "notice": notice,
        "error": error,
        "test_event": test_event,
        "return_url": return_url,
        "event_retention_days": settings.event_retention_days,
        "parked_retention_days": settings.parked_retention_days,
    }
    return templates.TemplateResponse(
        request, "portal.html", context, status_code=status_code, headers=NO_STORE
    )


# --- the guard every settings route passes -------------------------------------------------


@dataclass(frozen=True)
class PortalSession:
    portal_id: int
    value: str


async def _guard(request: Request, *, form: bool) -> PortalSession | Response:
    """The session, or the page to answer instead (401 none, 403 stale or a bad CSRF token)."""
    resources = services(request)
    found = read_portal_session(request, resources)
    if found is None:
        message = (
            "Your settings session has expired."
            if request.cookies.get(cookie_name(resources.settings, SESSION_COOKIE))
            else "This browser has no Hubline settings session."
        )
        return _signed_out(request, status_code=401, reason="no_session", message=message)
    portal_id, generation = found
    async with resources.sessions() as session:
        portal = await session.get(Portal, portal_id)
    if (
        portal is None
        or portal.install_generation != generation
        or portal.status == PortalStatus.uninstalled
    ):
        return _signed_out(
            request,
            status_code=403,
            reason="stale_session",
            message="This settings session belongs to an installation that has since been "
            "uninstalled or installed again.",
        )
    value = request.cookies[cookie_name(resources.settings, SESSION_COOKIE)]
    if form:
        data = await request.form()
        page_portal = str(data.get("portal_id", ""))
        # Digits only, as the page writes it: nothing a forged form sends is shown back.
        if page_portal.isascii() and page_portal.isdigit() and page_portal != str(portal_id):
            # One session per browser: installing or managing another portal in another
            # tab took it over. Said so, lest the next page show the other portal's secret
            # to someone setting up this one's receptionist.
            return error_page(
                request,
                status_code=409,
                title="This browser now manages another HubSpot account",
                message=f"This page was for portal {page_portal[:20]}, but this browser's "
                f"Hubline settings session is now portal {portal_id}'s (opened in another "
                f"tab). Nothing was changed. To manage portal {page_portal[:20]}, install "
                "Hubline again and choose that account.",
                reason="other_portal",
                action_label="Manage another account",
            )
        if not same_text(str(data.get("csrf", "")), csrf_token(resources, value)):
            return error_page(
                request,
                status_code=403,
                title="This form has expired",
                message="The page you sent it from is out of date. Go back, reload the "
                "settings page and try again.",
                reason="csrf",
                action_url="/settings",
                action_label="Reload the settings page",
            )
    return PortalSession(portal_id, value)


# What an action that changed something redirects with (`/settings?done=...`): the page
# a reload then asks for again is a GET, so a reload never rotates the secret once more.
DONE_ROTATED = "rotated"
DONE_REGION = "region"


def _after(done: str) -> Response:
    return RedirectResponse(f"/settings?done={done}", status_code=303, headers=NO_STORE)


async def show_settings(request: Request) -> Response:
    """The settings page again (after the OAuth flow opened a session in this browser)."""
    session = await _guard(request, form=False)
    if isinstance(session, Response):
        return session
    return await render_settings(
        request,
        services(request),
        portal_id=session.portal_id,
        session_value=session.value,
        done=request.query_params.get("done"),
    )


async def rotate(request: Request) -> Response:
    """Rotate the receptionist secret; the old one keeps working for the grace period."""
    session = await _guard(request, form=True)
    if isinstance(session, Response):
        return session
    resources = services(request)
    grace = timedelta(hours=resources.settings.secret_rotation_grace_hours)
    async with transaction(resources.sessions) as db:
        await rotate_secret(session.portal_id, session=db, cipher=resources.cipher, grace=grace)
    log.info("receptionist secret rotated from the settings page")
    return _after(DONE_ROTATED)


async def set_region(request: Request) -> Response:
    """Set (or clear) the region used for phone numbers written without a country code."""
    session = await _guard(request, form=True)
    if isinstance(session, Response):
        return session
    resources = services(request)
    chosen = region_code(str((await request.form()).get("region", "")))
    if chosen and chosen not in phonenumbers.SUPPORTED_REGIONS:
        return await render_settings(
            request,
            resources,
            portal_id=session.portal_id,
            session_value=session.value,
            error=f"{chosen[:8]!r} is not a region Hubline knows. Pick one from the list.",
            status_code=400,
        )
    async with transaction(resources.sessions) as db:
        portal = await db.get(Portal, session.portal_id)
        assert portal is not None
        portal.default_phone_region = chosen or None
        portal.updated_at = utcnow()
    return _after(DONE_REGION)


async def send_test_event(request: Request) -> Response:
    """Post a signed `test.ping` through the real receptionist route and show it arrived."""
    session = await _guard(request, form=True)
    if isinstance(session, Response):
        return session
    resources = services(request)
    portal_id = session.portal_id
    async with resources.sessions() as db:
        secret = await current_secret(portal_id, session=db, cipher=resources.cipher)
    assert secret is not None  # the guard found the portal installed
    now = utcnow()
    event_id = f"test_{uuid.uuid4().hex}"
    body = json.dumps(
        {"id": event_id, "type": PING, "occurred_at": now.isoformat().replace("+00:00", "Z")}
    )
    headers = {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret.reveal()).sign(event_id, now, body),
        "x-request-id": request_id_var.get() or uuid.uuid4().hex,
    }
    # Through the whole app in-process, exactly as a receptionist's request would go: the
    # server need not reach its own public URL (behind a proxy it often cannot).
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=request.app), base_url=resources.settings.public_url
    ) as http:
        answer = await http.post(
            f"/webhooks/portals/{portal_id}/receptionist", content=body, headers=headers
        )
    if not answer.is_success:
        log.warning("the test event was refused", extra={"status": answer.status_code})
        return await render_settings(
            request,
            resources,
            portal_id=portal_id,
            session_value=session.value,
            error=f"The test event was refused ({answer.status_code}). Reload this page and "
            "try again; if it keeps failing, contact Hubline's support.",
            status_code=502,
        )
    stored_id = int(answer.json()["event_id"])
    async with resources.sessions() as db:
        stored = await db.get(InboxEvent, stored_id)
    assert stored is not None
    return await render_settings(
        request,
        resources,
        portal_id=portal_id,
        session_value=session.value,
        test_event={
            "id": stored.id,
            "received_at": stored.received_at,
            "parked": stored.status == EventStatus.parked,
        },
    )


# --- every other error page ----------------------------------------------------------------

JSON_PREFIXES = ("/webhooks/", "/admin/api/", "/metrics", "/healthz", "/readyz")


async def http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and the like: JSON for machines, a page that says what to do for people."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if request.url.path.startswith(JSON_PREFIXES):
        reason = {404: "not_found", 405: "method_not_allowed"}.get(status, "error")
        return JSONResponse({"error": reason, "detail": None}, status_code=status)
    if status == 404:
        return error_page(
            request,
            status_code=404,
            title="There is no page here",
            message="The link may be mistyped or out of date. To set up or manage Hubline, "
            "start from HubSpot or from Hubline's start page.",
            reason="not_found",
            action_url="/",
            action_label="Go to the start page",
        )
    return error_page(
        request,
        status_code=status,
        title="That did not work",
        message="This page cannot be used that way. Go back to the start page and try again.",
        reason=f"http_{status}",
        action_url="/",
        action_label="Go to the start page",
    )


async def server_error(request: Request, _exc: Exception) -> Response:
    """An unexpected failure: say so plainly; the details are in the logs, not the page."""
    if request.url.path.startswith(JSON_PREFIXES):
        return JSONResponse({"error": "internal_error", "detail": None}, status_code=500)
    return error_page(
        request,
        status_code=500,
        title="Something went wrong on our side",
        message="Nothing you did caused this, and nothing was changed. Please try again in a "
        "minute; if it keeps happening, contact Hubline's support.",
        reason="internal_error",
        action_url="/",
        action_label="Go to the start page",
    )


async def client_gone(request: Request, _exc: Exception) -> Response:
    """The client went away before sending the whole body: nothing was read, nothing done.

    Not a fault here (it was a 500 with a traceback): a 400, which no one receives, so
    that the request's log line says what happened.
    """
    log.info(
        "%s %s: the client disconnected before its body ended", request.method, request.url.path
    )
    return Response(status_code=400)


async def database_unreachable(request: Request, exc: Exception) -> Response:
    """The database cannot be used now: a 503 that says so, like /readyz and the CLI."""
    # One line, not a traceback: the cause is the database's state, not a fault here.
    log.warning(
        "%s %s: the database cannot be reached (%s)",
        request.method,
        request.url.path,
        type(exc).__name__,
    )
    if request.url.path.startswith(JSON_PREFIXES):
        detail = "the database cannot be reached; try again in a moment"
        return JSONResponse({"error": "database_unavailable", "detail": detail}, status_code=503)
    return error_page(
        request,
        status_code=503,
        title="The database cannot be reached",
        message="Hubline cannot read or save anything right now, and nothing was changed. "
        "Please try again in a moment.",
        reason="database_unavailable",
        # The page it failed on, by GET: a console action's URL answers only its POST.
        action_url="/admin" if request.url.path.startswith("/admin") else "/",
        action_label="Try again",
    )


exception_handlers: dict[Any, Any] = {
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    500: server_error,
    **dict.fromkeys(UNREACHABLE, database_unreachable),
}

routes: list[BaseRoute] = [
    Route("/settings", show_settings, methods=["GET"]),
    Route("/settings/rotate-secret", rotate, methods=["POST"]),
    Route("/settings/test-event", send_test_event, methods=["POST"]),
    Route("/settings/phone-region", set_region, methods=["POST"]),
]
