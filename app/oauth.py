"""The install flow: landing page, `/oauth/install` and the `/oauth/callback` guard clauses.

The state is 256 random bits, stored only as a hash with a 10-minute expiry, bound to
the browser by a cookie, and consumed by one atomic `DELETE … RETURNING`. A callback
with a code and no state at all is an install that began on HubSpot's marketplace
listing: it binds the portal to no local account, and the code exchange (client
secret plus the exact redirect URI) proves HubSpot issued the code for this app.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy as sa
from authlib.common.security import generate_token
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from app.db import transaction
from app.errors import ClientRefused, HubSpotAuthError, HubSpotError
from app.hubspot.oauth2 import HubSpotOAuth, TokenResponse
from app.lifecycle import InstallOutcome, install_url, record_install
from app.main import Services, services
from app.models import OAuthState, utcnow
from app.settings_page import (
    cookie_name,
    render_settings,
    set_session_cookie,
    sign_portal_session,
)
from app.vault import code_verifier_context

log = logging.getLogger(__name__)

STATE_COOKIE = "hubline_oauth"
STATE_LIFETIME = timedelta(minutes=10)
NO_STORE = {"Cache-Control": "no-store"}
# HubSpot's own app domains: app.hubspot.com and regional app-<hublet>.hubspot.com.
HUBSPOT_APP_HOST = re.compile(r"app(-[a-z0-9]+)?\.hubspot\.com")

templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def landing(request: Request) -> Response:
    """The landing page: install, or manage an existing installation (the same flow)."""
    install = install_url(services(request).settings)
    return templates.TemplateResponse(request, "landing.html", {"install_url": install})


async def install(request: Request) -> Response:
    """Start the OAuth flow: a one-time state bound to this browser, then HubSpot's consent."""
    resources = services(request)
    settings = resources.settings
    # Reuse this browser's binding so two install tabs do not invalidate each other.
    browser = request.cookies.get(cookie_name(settings, STATE_COOKIE)) or ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{43,}", browser):
        browser = secrets.token_urlsafe(32)
    state = secrets.token_urlsafe(32)
    state_hash = _hash(state)
    verifier = generate_token(64) if settings.hubspot_pkce else None
    async with transaction(resources.sessions) as session:
        session.add(
            OAuthState(
                state_hash=state_hash,
                browser_hash=_hash(browser),
                code_verifier_ct=(
                    resources.cipher.encrypt(verifier, context=code_verifier_context(state_hash))
                    if verifier
                    else None
                ),
                key_id=resources.cipher.primary_key_id if verifier else None,
                expires_at=utcnow() + STATE_LIFETIME,
            )
        )
    url = HubSpotOAuth(settings, resources.http).authorization_url(
        state=state, code_verifier=verifier
    )
    response = RedirectResponse(url, status_code=302, headers=NO_STORE)
    secure = settings.served_over_https
    response.set_cookie(
        cookie_name(settings, STATE_COOKIE),
        browser,
        max_age=int(STATE_LIFETIME.total_seconds()),
        # A `__Host-` cookie must be the whole site's (over http the name has no prefix).
        path="/" if secure else "/oauth",
        secure=secure,
        httponly=True,
        samesite="lax",
    )
    return response


# --- the callback -----------------------------------------------------------------------


@dataclass
class CallbackFailure(Exception):
    """Why a callback failed: a named reason, an HTTP status and words a person understands."""

    reason: str
    status: int
    title: str
    message: str


@dataclass(frozen=True)
class Installed:
    outcome: InstallOutcome
    portal_id: int
    bound_to_browser: bool  # the callback consumed a state this browser's cookie holds


async def callback(request: Request) -> Response:
    """Finish the install and show the portal's settings page, or a clear error page."""
    resources = services(request)
    try:
        installed = await complete_install(request, resources)
    except CallbackFailure as failure:
        log.info("install callback failed: %s", failure.reason, extra={"reason": failure.reason})
        return error_page(request, failure)
    if not installed.bound_to_browser:
        # An install begun on the marketplace listing carries no state, so nothing shows
        # that this browser's user made it: a link with someone else's code would show
        # them that account's secret. The state-bound flow proves it before any secret.
        return installed_page(request, installed)
    # The browser-binding cookie stays (it expires by itself): it holds no state, and a
    # second tab's install still needs it.
    return await settings_page(request, resources, installed)


# RFC 6749 §4.1.2.1's error codes, in words a person installing the app can act on.
_OAUTH_ERRORS = {
    "access_denied": "The install was not approved. Start the install again to approve it.",
    "invalid_request": "HubSpot refused the install request. Please start the install again.",
    "unauthorized_client": "HubSpot does not allow this app to be installed this way.",
    "unsupported_response_type": "HubSpot refused the install request.",
    "invalid_scope": "HubSpot refused the permissions this app asks for.",
    "server_error": "HubSpot could not complete the install. Please try again.",
    "temporarily_unavailable": "HubSpot is briefly unavailable. Please try again in a minute.",
}


async def complete_install(request: Request, resources: Services) -> Installed:
    """The callback's guard clauses, in order; each failure is a `CallbackFailure`."""
    params = request.query_params
    if "error" in params:
        # Anyone can send a link carrying any description: the page, on Hubline's own
        # origin, says only what the standard error code means; the description is logged.
        log.info(
            "HubSpot's install error: %s",
            params.get("error_description", "")[:500],
            extra={"oauth_error": params["error"][:64]},
        )
        raise CallbackFailure(
            "hubspot_error",
            400,
            "HubSpot did not complete the install",
            _OAUTH_ERRORS.get(params["error"], _OAUTH_ERRORS["server_error"]),
        )
    verifier: str | None = None
    state_checked = "state" in params
    if state_checked:
        verifier = await consume_state(
            params["state"],
            request.cookies.get(cookie_name(resources.settings, STATE_COOKIE)),
            resources,
        )
    code = params.get("code")
    if not code:
        raise CallbackFailure(
            "missing_code",
            400,
            "The install link is incomplete",
            "HubSpot's answer carried no authorization code. Please start the install again.",
        )
    tokens = await exchange(code, verifier, resources)
    portal_id, hub_domain = await identify(tokens, resources)
    async with transaction(resources.sessions) as session:
        outcome = await record_install(
            portal_id,
            tokens,
            hub_domain=hub_domain,
            settings=resources.settings,
            session=session,
            cipher=resources.cipher,
        )
    log.info(
        "portal %s",
        "reinstalled" if outcome.reinstall else "installed",
        extra={"portal_id": portal_id, "install_generation": outcome.portal.install_generation},
    )
    return Installed(outcome, portal_id, bound_to_browser=state_checked)


async def consume_state(state: str, cookie: str | None, resources: Services) -> str | None:
    """Check and use up a state; returns its PKCE verifier (if any)."""
    if not cookie:
        raise CallbackFailure(
            "missing_cookie",
            400,
            "This install was started in another browser",
            "Finish the install in the browser where you clicked Install, or start again here.",
        )
    state_hash = _hash(state)
    used_up = CallbackFailure(
        "unknown_state",
        400,
        "This install link was already used",
        "Each install link works once. Please start the install again.",
    )
    async with transaction(resources.sessions) as session:
        found = (
            await session.execute(
                sa.select(col(OAuthState.browser_hash), col(OAuthState.expires_at)).where(
                    col(OAuthState.state_hash) == state_hash
                )
            )
        ).first()
        if found is None:
            raise used_up
        browser_hash, expires_at = found
        # Checked before the state is used up: a callback opened in another browser (anyone
        # who saw the URL) must not cancel the install for the browser that started it.
        if not hmac.compare_digest(browser_hash, _hash(cookie)):
            raise CallbackFailure(
                "state_mismatch",
                403,
                "This install was started in another browser",
                "Finish the install in the browser where you clicked Install, or start again here.",
            )
        if expires_at <= utcnow():
            raise CallbackFailure(
                "expired_state",
                400,
                "This install link has expired",
                "Install links are valid for 10 minutes. Please start the install again.",
            )
        # One atomic statement: of any number of concurrent callbacks, one gets the row.
        verifier_row = (
            await session.execute(
                sa.delete(OAuthState)
                .where(col(OAuthState.state_hash) == state_hash)
                .returning(col(OAuthState.code_verifier_ct))
            )
        ).first()
    if verifier_row is None:
        raise used_up
    verifier_ct = verifier_row[0]
    if verifier_ct is None:
        return None
    return resources.cipher.decrypt_str(verifier_ct, context=code_verifier_context(state_hash))


async def exchange(code: str, verifier: str | None, resources: Services) -> TokenResponse:
    """Trade the code for tokens; never retried, since a code works only once."""
    oauth = HubSpotOAuth(resources.settings, resources.http)
    try:
        return await oauth.exchange_code(code, code_verifier=verifier)
    except ClientRefused as error:
        log.error("code exchange refused: %s", error, extra={"status": error.status_code})
        raise CallbackFailure(
            "exchange_rejected",
            400,
            "HubSpot did not accept this install",
            "HubSpot refused this app's own credentials, so nothing was installed: its "
            "operator must check the app's HubSpot settings. Please try again later.",
        ) from None
    except HubSpotAuthError as error:
        log.info(
            "code exchange refused", extra={"status": error.status_code, "category": error.category}
        )
        raise CallbackFailure(
            "exchange_rejected",
            400,
            "HubSpot did not accept this install",
            "The authorization code was refused (it may have expired or been used). "
            "Please start the install again.",
        ) from None
    except HubSpotError as error:
        log.warning("code exchange failed", extra={"status": error.status_code})
        raise CallbackFailure(
            "exchange_failed",
            400,
            "HubSpot could not be reached",
            "HubSpot did not answer in time. Nothing was installed; please try again.",
        ) from None


async def identify(tokens: TokenResponse, resources: Services) -> tuple[int, str]:
    """The portal id from the token answer (or introspection), never from the query string."""
    oauth = HubSpotOAuth(resources.settings, resources.http)
    hub_id = tokens.hub_id
    try:
        described = await oauth.introspect(tokens.access_token)
    except HubSpotError as error:
        log.info(
            "introspection failed; the hub domain stays unknown",
            extra={"status": error.status_code},
        )
        described = {}
    if hub_id is None and described.get("hub_id") is not None:
        hub_id = int(described["hub_id"])
    if hub_id is None:
        raise CallbackFailure(
            "no_portal_id",
            400,
            "HubSpot did not say which account this is",
            "Please start the install again.",
        )
    return hub_id, str(described.get("hub_domain") or "")


# --- pages --------------------------------------------------------------------------------


def safe_return_url(value: str | None) -> str | None:
    """A `returnUrl` on HubSpot's own app domain, else None (never an open redirect)."""
    if not value:
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "https" or parts.username or parts.password or port is not None:
        return None
    if not HUBSPOT_APP_HOST.fullmatch(parts.hostname or ""):
        return None
    return value


async def settings_page(request: Request, resources: Services, installed: Installed) -> Response:
    """The portal's settings page, opening this browser's session for its settings actions."""
    session_value = sign_portal_session(
        resources, installed.portal_id, installed.outcome.portal.install_generation
    )
    response = await render_settings(
        request,
        resources,
        portal_id=installed.portal_id,
        session_value=session_value,
        reinstall=installed.outcome.reinstall,
        return_url=safe_return_url(request.query_params.get("returnUrl")),
    )
    if response.status_code == 200:
        set_session_cookie(response, resources, session_value)
    return response


def installed_page(request: Request, installed: Installed) -> Response:
    """The install is done; the settings page waits for the state-bound flow."""
    return templates.TemplateResponse(
        request,
        "installed.html",
        {
            "portal_id": installed.portal_id,
            "hub_domain": installed.outcome.portal.hub_domain,
            "return_url": safe_return_url(request.query_params.get("returnUrl")),
            "install_url": install_url(services(request).settings),
        },
        headers=NO_STORE,
    )


def error_page(request: Request, failure: CallbackFailure) -> Response:
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "title": failure.title,
            "message": failure.message,
            "reason": failure.reason,
            "action_url": install_url(services(request).settings),
            "action_label": "Start the install again",
        },
        status_code=failure.status,
        headers=NO_STORE,
    )


routes: list[BaseRoute] = [
    Route("/", landing, methods=["GET"]),
    Route("/oauth/install", install, methods=["GET"]),
    Route("/oauth/callback", callback, methods=["GET"]),
]
