"""Helpers for tests that talk to the sandbox: a manual clock and a one-call install."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit, urlunsplit

import httpx

from app.sandbox.config import SandboxConfig


class ManualClock:
    """A clock that moves only when told; pass it as `SandboxConfig(clock=...)`."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


class DeferredASGITransport(httpx.AsyncBaseTransport):
    """Forwards to an ASGI app set after creation, to wire two in-process apps to each other.

    E.g. `create_sandbox_app(config, webhook_transport=t)`, build Hubline, then `t.app = hubline`.
    """

    def __init__(self) -> None:
        self.app: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.app is None:
            raise httpx.ConnectError("no app to deliver to yet", request=request)
        return await httpx.ASGITransport(app=self.app).handle_async_request(request)


def pkce_pair() -> tuple[str, str]:
    """A (code_verifier, S256 code_challenge) pair."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def authorize(
    client: httpx.AsyncClient,
    config: SandboxConfig,
    portal_id: int,
    *,
    redirect_uri: str = "http://localhost:8000/oauth/callback",
    scope: str = "oauth crm.objects.contacts.read crm.objects.contacts.write "
    "crm.schemas.contacts.read crm.schemas.contacts.write",
    optional_scope: str = "crm.objects.marketing_events.read crm.objects.marketing_events.write",
    state: str | None = "test-state",
    code_challenge: str | None = None,
) -> httpx.Response:
    """Press Approve for a portal without a browser; answers the 302 to the redirect URI."""
    form = {
        "client_id": config.client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "optional_scope": optional_scope,
        "portal_id": str(portal_id),
    }
    if state is not None:
        form["state"] = state
    if code_challenge is not None:
        form |= {"code_challenge": code_challenge, "code_challenge_method": "S256"}
    return await client.post("/oauth/authorize/approve", data=form)


async def approve(client: httpx.AsyncClient, authorize_url: str, portal_id: int) -> str:
    """Press Approve, for a portal, on the authorize page an app sent the browser to.

    Answers where the sandbox sends the browser back: the app's redirect URI with the code
    (and the app's state), to be opened with the client that holds the app's cookies.
    """
    page = urlsplit(authorize_url)
    form = dict(parse_qsl(page.query))
    form["portal_id"] = str(portal_id)
    approve_url = urlunsplit((page.scheme, page.netloc, f"{page.path}/approve", "", ""))
    approved = await client.post(approve_url, data=form)
    if approved.status_code != 302:
        raise RuntimeError(f"the sandbox's approve answered {approved.status_code}")
    return approved.headers["location"]


def code_from(response: httpx.Response) -> str:
    """The `code` in an approve redirect."""
    query = parse_qs(urlsplit(response.headers["location"]).query)
    return query["code"][0]


async def install(
    client: httpx.AsyncClient,
    config: SandboxConfig,
    portal_id: int,
    *,
    redirect_uri: str = "http://localhost:8000/oauth/callback",
    **authorize_args: Any,
) -> dict[str, Any]:
    """Approve and exchange the code; answers the token response."""
    approved = await authorize(
        client, config, portal_id, redirect_uri=redirect_uri, **authorize_args
    )
    response = await client.post(
        "/oauth/v3/token",
        data={
            "grant_type": "authorization_code",
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "redirect_uri": redirect_uri,
            "code": code_from(approved),
        },
    )
    response.raise_for_status()
    tokens: dict[str, Any] = response.json()
    return tokens
