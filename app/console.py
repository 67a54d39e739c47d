"""The operator console: server-rendered pages under /admin, behind ADMIN_TOKEN.

Signing in with the token sets an HttpOnly, SameSite=Strict session cookie signed
with a key derived from the encryption key and the admin token itself, so changing
ADMIN_TOKEN signs everyone out. Every form carries a CSRF token derived from the
session. Wrong tokens are answered ever more slowly. With ADMIN_TOKEN unset, /admin
does not exist (404).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from app.crypto import Secret, same_text
from app.db import parse_id, transaction
from app.errors import HubSpotNotReached
from app.inbox import newest_of_portal, retry_events
from app.main import Services, services
from app.middleware import portal_of_path
from app.models import (
    AppState,
    EngagementRecord,
    EventSource,
    EventStatus,
    InboxEvent,
    OAuthToken,
    Portal,
    PortalProblem,
    PortalStatus,
    failed_status,
    utcnow,
)
from app.portals import rotate_secret
from app.properties import request_provisioning

templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")

SESSION_COOKIE = "hubline_admin"
SESSION_SECONDS = 8 * 3600
BACKLOG_ATTENTION = 100
STALE_PENDING_ATTENTION = timedelta(minutes=5)
NO_STORE = {"Cache-Control": "no-store"}
DEFAULT_REFRESH_MS = 30_000
MAX_REFRESH_MS = 3_600_000
TOO_MANY_ATTEMPTS = "Too many sign-in attempts at once: wait for the last one to finish."


# --- sign-in, sessions and CSRF ----------------------------------------------------------


class FailedSignIns:
    """Per-client failure counts for the admin token, on the console and the API alike.

    A client's attempts are checked one at a time and each wrong token waits longer than
    the last, so guesses sent in parallel gain nothing; past `MAX_WAITING` queued attempts
    a client's further ones are turned away unchecked.
    """

    MAX_WAITING = 5

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._failures: dict[str, tuple[int, float]] = {}
        self._waiting: dict[str, int] = {}
        self._turns: dict[str, asyncio.Lock] = {}

    async def check(self, client: str, given: str, expected: str) -> bool | None:
        """Whether `given` is the token; None when the client has too many attempts queued."""
        if self._waiting.get(client, 0) >= self.MAX_WAITING:
            return None
        self._waiting[client] = self._waiting.get(client, 0) + 1
        turn = self._turns.setdefault(client, asyncio.Lock())
        try:
            async with turn:
                await self._sleep(self._delay(client))
                if same_text(given, expected):
                    self._failures.pop(client, None)
                    return True
                self._failed(client)
                return False
        finally:
            self._waiting[client] -= 1
            if not self._waiting[client]:
                # Nobody else holds or awaits this lock: the next attempt makes a new one.
                del self._waiting[client], self._turns[client]

    def _delay(self, client: str) -> float:
        failures, last = self._failures.get(client, (0, 0.0))
        if self._clock() - last > 900:
            return 0.0
        return min(0.25 * 2 ** max(failures - 1, 0), 8.0) if failures else 0.0

    def _failed(self, client: str) -> None:
        failures, _ = self._failures.get(client, (0, 0.0))
        self._failures[client] = (failures + 1, self._clock())
        if len(self._failures) > 10_000:  # never let a spray of addresses grow this forever
            self._failures.clear()


def failed_sign_ins(request: Request) -> FailedSignIns:
    """The app's failure counts (one per app, so each test starts from zero)."""
    state = request.app.state
    if not hasattr(state, "failed_sign_ins"):
        state.failed_sign_ins = FailedSignIns()
    counts: FailedSignIns = state.failed_sign_ins
    return counts


def _session_key(resources: Services) -> bytes:
    admin_token = resources.settings.admin_token.get_secret_value().encode()
    return hmac.new(
        resources.cipher.derive_key("admin-session"), admin_token, hashlib.sha256
    ).digest()


def _sign(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def issue_session(resources: Services) -> str:
    expires = int(time.time()) + SESSION_SECONDS
    nonce = secrets.token_urlsafe(16)
    payload = f"{expires}.{nonce}"
    return f"{payload}.{_sign(_session_key(resources), payload)}"


@dataclass(frozen=True)
class AdminSession:
    nonce: str
    csrf_token: str
    expires: int = 0  # 0: a page read with the bearer token, which has no cookie to end


# A signed-out session's nonce, kept until the session would have expired: the cookie
# alone would otherwise stay valid for its 8 hours wherever a copy of it survived.
SIGNED_OUT = "console.signed_out."


def read_session(request: Request) -> AdminSession | None:
    resources = services(request)
    value = request.cookies.get(SESSION_COOKIE, "")
    expires, _, rest = value.partition(".")
    nonce, _, signature = rest.partition(".")
    if not (expires.isdigit() and nonce and signature):
        return None
    key = _session_key(resources)
    if not same_text(signature, _sign(key, f"{expires}.{nonce}")):
        return None
    if int(expires) < time.time():
        return None
    return AdminSession(nonce=nonce, csrf_token=_sign(key, f"csrf.{nonce}"), expires=int(expires))


async def _signed_out(resources: Services, session: AdminSession) -> bool:
    async with resources.sessions() as db_session:
        return await db_session.get(AppState, SIGNED_OUT + session.nonce) is not None


async def _sign_out(resources: Services, session: AdminSession) -> None:
    async with transaction(resources.sessions) as db_session:
        # Sessions that have expired since their sign-out need no record any more. The
        # expiry is kept as fixed-width digits, compared as text: a cast could meet
        # app_state's other values, which are not numbers.
        await db_session.execute(
            sa.delete(AppState).where(
                col(AppState.name).startswith(SIGNED_OUT, autoescape=True),
                col(AppState.value) < _epoch_text(int(time.time())),
            )
        )
        ended = AppState(name=SIGNED_OUT + session.nonce, value=_epoch_text(session.expires))
        await db_session.merge(ended)


def _epoch_text(seconds: int) -> str:
    return f"{seconds:012d}"


async def check_bearer(request: Request) -> bool | None:
    """Whether `Authorization: Bearer` carries ADMIN_TOKEN; None while this address's
    wrong guesses are slowed down. Only a presented token is a guess: none is False at once.
    """
    expected = services(request).settings.admin_token.get_secret_value()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    token = given.strip() if scheme.lower() == "bearer" else ""
    if not token:
        return False
    return await failed_sign_ins(request).check(client_address(request), token, expected)


def console_enabled(request: Request) -> bool:
    return bool(services(request).settings.admin_token.get_secret_value())


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def not_found() -> Response:
    return Response("Not Found", status_code=404, media_type="text/plain")


def sign_in_page(request: Request, *, status_code: int, message: str = "") -> Response:
    return templates.TemplateResponse(
        request,
        "console_login.html",
        {"message": message},
        status_code=status_code,
        headers=NO_STORE,
    )


async def login(request: Request) -> Response:
    """Check the admin token from the sign-in form and start a session."""
    if not console_enabled(request):
        return not_found()
    form = await request.form()
    resources = services(request)
    right = await failed_sign_ins(request).check(
        client_address(request),
        str(form.get("token", "")),
        resources.settings.admin_token.get_secret_value(),
    )
    if right is None:
        return sign_in_page(request, status_code=429, message=TOO_MANY_ATTEMPTS)
    if not right:
        return sign_in_page(request, status_code=401, message="That token is not right.")
    response = RedirectResponse("/admin", status_code=303, headers=NO_STORE)
    response.set_cookie(
        SESSION_COOKIE,
        issue_session(services(request)),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=resources.settings.served_over_https,
        path="/admin",
    )
    return response


async def logout(request: Request) -> Response:
    """End the session (a form with the CSRF token: another site cannot sign you out)."""
    session = await _guard(request, form=True)
    if isinstance(session, Response):
        return session
    if session.expires:  # a bearer-token reader has no session to end
        await _sign_out(services(request), session)
    response = RedirectResponse("/admin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/admin")
    return response


async def _guard(request: Request, *, form: bool = False) -> AdminSession | Response:
    """The session, or the answer instead: 404 when off, 401 signed out, 403 on a bad CSRF token."""
    if not console_enabled(request):
        return not_found()
    session = read_session(request)
    if session is not None and await _signed_out(services(request), session):
        session = None
    if session is None and not form and request.headers.get("authorization"):
        # A script may read the pages with the API's bearer token. Forms still need the
        # signed-in cookie and its CSRF token: a page read this way cannot post them.
        right = await check_bearer(request)
        if right is None:
            return sign_in_page(request, status_code=429, message=TOO_MANY_ATTEMPTS)
        if right:
            return AdminSession(nonce=secrets.token_urlsafe(16), csrf_token="")
    if session is None:
        return sign_in_page(request, status_code=401)
    if form:
        data = await request.form()
        if not same_text(str(data.get("csrf", "")), session.csrf_token):
            return Response("The form expired; go back and reload the page.", status_code=403)
    return session


# --- the portals table -----------------------------------------------------------------


async def portal_rows(
    resources: Services, *, query: str = "", status: str = "", portal_id: int | None = None
) -> list[dict[str, Any]]:
    """Every portal (or one) with what an operator needs at a glance, in a handful of queries."""
    day_ago = utcnow() - timedelta(hours=24)
    async with resources.sessions() as session:
        select = sa.select(Portal).order_by(col(Portal.portal_id))
        if portal_id is not None:
            select = select.where(col(Portal.portal_id) == portal_id)
        if status:
            select = select.where(col(Portal.status) == status)
        if query:
            pattern = f"%{query.strip().lower()}%"
            select = select.where(
                sa.or_(
                    sa.func.lower(col(Portal.hub_domain)).like(pattern),
                    sa.cast(col(Portal.portal_id), sa.String).like(pattern),
                )
            )
        portals = list((await session.execute(select)).scalars())
        ids = [p.portal_id for p in portals]
        expiry = dict(
            (
                await session.execute(
                    sa.select(col(OAuthToken.portal_id), col(OAuthToken.expires_at)).where(
                        col(OAuthToken.portal_id).in_(ids)
                    )
                )
            ).all()
        )
        pending = {
            portal_id: (count, oldest)
            for portal_id, count, oldest in (
                await session.execute(
                    sa.select(
                        col(InboxEvent.portal_id),
                        sa.func.count(),
                        sa.func.min(col(InboxEvent.received_at)),
                    )
                    .where(
                        col(InboxEvent.portal_id).in_(ids),
                        col(InboxEvent.status).in_([EventStatus.pending, EventStatus.in_progress]),
                    )
                    .group_by(col(InboxEvent.portal_id))
                )
            ).all()
        }
        failed = dict(
            (
                await session.execute(
                    sa.select(col(InboxEvent.portal_id), sa.func.count())
                    .where(
                        col(InboxEvent.portal_id).in_(ids),
                        failed_status(),
                        # When it failed, not when it came in: a retried or long parked
                        # event fails days after its receipt.
                        col(InboxEvent.finished_at) >= day_ago,
                    )
                    .group_by(col(InboxEvent.portal_id))
                )
            ).all()
        )
        problems: dict[int, list[str]] = {}
        for problem in (
            await session.execute(
                sa.select(PortalProblem).where(col(PortalProblem.portal_id).in_(ids))
            )
        ).scalars():
            problems.setdefault(problem.portal_id, []).append(problem.message)
    rows = []
    for portal in portals:
        backlog, oldest = pending.get(portal.portal_id, (0, None))
        attention = []
        if portal.status == PortalStatus.needs_reauth:
            attention.append("needs re-authorization")
        if problems.get(portal.portal_id):
            attention.append(f"{len(problems[portal.portal_id])} problem(s)")
        if backlog >= BACKLOG_ATTENTION or (
            oldest is not None and utcnow() - oldest > STALE_PENDING_ATTENTION
        ):
            attention.append("backlog growing")
        if failed.get(portal.portal_id):
            attention.append(f"{failed[portal.portal_id]} failed in 24 h")
        rows.append(
            {
                "portal": portal,
                "token_expires_at": expiry.get(portal.portal_id),
                "last_sync": portal.last_synced_at,
                "pending": backlog,
                "failed_24h": failed.get(portal.portal_id, 0),
                "problems": problems.get(portal.portal_id, []),
                "attention": attention,
            }
        )
    return rows


MAX_SEARCH = 253  # the longest domain name


async def console_home(request: Request) -> Response:
    """The portals table, searchable and filterable by status."""
    session = await _guard(request)
    if isinstance(session, Response):
        return session
    # No hub domain is longer (SQLite refuses a LIKE pattern past 50,000 characters), and
    # none holds a NUL (which PostgreSQL's text refuses).
    query = request.query_params.get("q", "").replace("\x00", "")[:MAX_SEARCH]
    status = request.query_params.get("status", "")
    if status and status not in {s.value for s in PortalStatus}:
        status = ""
    rows = await portal_rows(services(request), query=query, status=status)
    # `?refresh=` (milliseconds, at least one second) shortens the auto-refresh.
    refresh = request.query_params.get("refresh", "")
    refresh_ms = (
        min(max(int(refresh), 1000), MAX_REFRESH_MS)
        if refresh.isascii() and refresh.isdigit() and len(refresh) <= 9
        else DEFAULT_REFRESH_MS
    )
    return templates.TemplateResponse(
        request,
        "console_portals.html",
        {
            "rows": rows,
            "q": query,
            "status": status,
            "statuses": [s.value for s in PortalStatus],
            "csrf": session.csrf_token,
            "refresh_ms": refresh_ms,
        },
        headers=NO_STORE,
    )


# --- one portal ------------------------------------------------------------------------


def hubspot_contact_url(resources: Services, portal_id: int, contact_id: str) -> str:
    """The contact's record in HubSpot's UI (the sandbox serves the same path)."""
    return f"{resources.settings.hubspot_auth_url}/contacts/{portal_id}/record/0-1/{contact_id}"


async def recent_events(
    resources: Services, portal_id: int, *, limit: int = 50, source: str = ""
) -> list[dict[str, Any]]:
    """A portal's newest events by when they happened (of one source, if given), with
    engagements and contact links."""
    async with resources.sessions() as db:
        events = await newest_of_portal(db, portal_id, limit=limit, source=source)
        engagements = {
            record.event_id: record
            for record in (
                await db.execute(
                    sa.select(EngagementRecord).where(
                        col(EngagementRecord.event_id).in_([e.id for e in events])
                    )
                )
            ).scalars()
        }
    shown = []
    for event in events:
        engagement = engagements.get(event.id or 0)
        contact_id = engagement.contact_id if engagement else event.contact_id
        shown.append(
            {
                "event": event,
                "engagement": engagement,
                "contact_url": hubspot_contact_url(resources, portal_id, contact_id)
                if contact_id
                else None,
            }
        )
    return shown


async def retry_failed(resources: Services, portal_id: int, event_ids: list[int] | None) -> int:
    """Queue a portal's failed events (these, or all of them) again; returns how many."""
    async with transaction(resources.sessions) as db:
        return await retry_events(session=db, portal_id=portal_id, event_ids=event_ids)


async def rotate_portal_secret(resources: Services, portal_id: int) -> Secret:
    """A new receptionist secret; the old one keeps working for the grace period."""
    grace = timedelta(hours=resources.settings.secret_rotation_grace_hours)
    async with transaction(resources.sessions) as db:
        return await rotate_secret(portal_id, session=db, cipher=resources.cipher, grace=grace)


async def console_portal(request: Request) -> Response:
    """A portal's recent events, problems and actions."""
    session = await _guard(request)
    if isinstance(session, Response):
        return session
    # After an action the browser is sent here (post, redirect, get), told what was done
    # by a code, never by text from the URL: a reload then shows the page, not the action
    # again, and the page's own links work.
    done = request.query_params.get("done", "")
    notice = DONE_NOTICES.get(done, "")
    if done == "retried":
        count = parse_id(request.query_params.get("count", "")) or 0
        notice = notice.format(count=count)
    return await _portal_page(request, session, notice=notice)


DONE_NOTICES = {
    "retried": "Queued {count} failed event(s) again.",
    "provision": "Properties provisioning queued.",
    "disconnect": "Disconnected: the uninstall is being processed.",
    "already_uninstalled": "The portal was already uninstalled: nothing to do.",
}


def _done(portal_id: int, code: str, **details: int) -> Response:
    query = urlencode({"done": code, **details})
    return RedirectResponse(f"/admin/portals/{portal_id}?{query}", status_code=303)


async def _portal_page(
    request: Request,
    session: AdminSession,
    *,
    notice: str,
    new_secret: str = "",
    status_code: int = 200,
) -> Response:
    resources = services(request)
    portal_id = portal_of_path(request)
    rows = await portal_rows(resources, portal_id=portal_id) if portal_id is not None else []
    if portal_id is None or not rows:
        return Response("No such portal.", status_code=404)
    row = rows[0]
    source = request.query_params.get("source", "")
    if source not in {s.value for s in EventSource}:
        source = ""
    shown = await recent_events(resources, portal_id, source=source)
    return templates.TemplateResponse(
        request,
        "console_portal.html",
        {
            "row": row,
            "events": shown,
            "csrf": session.csrf_token,
            "notice": notice,
            "new_secret": new_secret,
            "default_region": resources.settings.default_phone_region,
            "source": source,
            "sources": [s.value for s in EventSource],
        },
        status_code=status_code,
        headers=NO_STORE,
    )


async def portal_action(request: Request) -> Response:
    """Retry failed events, rotate the secret, re-run provisioning, or disconnect."""
    session = await _guard(request, form=True)
    if isinstance(session, Response):
        return session
    resources = services(request)
    portal_id = portal_of_path(request)
    action = request.path_params["action"]
    form = await request.form()
    if portal_id is None:
        return Response("No such portal.", status_code=404)
    async with resources.sessions() as db:
        portal = await db.get(Portal, portal_id)
    if portal is None:
        return Response("No such portal.", status_code=404)
    if action == "retry":
        # No event id: every failed event of the portal. One that names no event: none.
        event_id = str(form.get("event_id", "")).strip()
        chosen = parse_id(event_id)
        count = await retry_failed(
            resources, portal_id, None if not event_id else [chosen] if chosen is not None else []
        )
        return _done(portal_id, "retried", count=count)
    if action == "rotate-secret":
        # Answered in place, not redirected: the new secret is shown this once and must
        # not travel in a URL.
        secret = await rotate_portal_secret(resources, portal_id)
        return await _portal_page(
            request,
            session,
            notice="The receptionist secret was rotated. The old one keeps working "
            f"for {resources.settings.secret_rotation_grace_hours:g} hours.",
            new_secret=secret.reveal(),
        )
    if action == "provision":
        await request_provisioning(resources, portal_id, key=f"console:{uuid.uuid4()}")
        return _done(portal_id, "provision")
    if action == "disconnect":
        if form.get("confirm") != "yes":
            return await _portal_page(
                request, session, notice="Tick the confirmation box to disconnect.", status_code=400
            )
        from app.lifecycle import disconnect

        try:
            outcome = await disconnect(resources, portal_id)
        except HubSpotNotReached as error:
            return await _portal_page(request, session, notice=f"{error}.", status_code=503)
        return _done(
            portal_id, "already_uninstalled" if outcome.already_uninstalled else "disconnect"
        )
    return Response("Unknown action.", status_code=404)


routes: list[BaseRoute] = [
    Route("/admin", console_home, methods=["GET"]),
    Route("/admin/login", login, methods=["POST"]),
    Route("/admin/logout", logout, methods=["POST"]),
    # Read by `portal_of_path` (see app/admin.py's routes).
    Route("/admin/portals/{portal_id}", console_portal, methods=["GET"]),
    Route("/admin/portals/{portal_id}/{action}", portal_action, methods=["POST"]),
]
