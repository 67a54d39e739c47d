"""HubSpot's OAuth 2 endpoints, spoken through authlib on top of the shared httpx client.

authlib builds every request (authorize URL, code and refresh grants, client
credentials, revocation, introspection) and parses every token answer; this module
only sends them through `services.http`, so one connection pool and one transport
seam serve OAuth and the API alike, and turns failures into the app's error tree.
HubSpot wants the client credentials in the form body (`client_secret_post`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.urls import url_decode
from authlib.oauth2.client import OAuth2Client

from app.crypto import Secret
from app.errors import (
    ClientRefused,
    HubSpotAuthError,
    HubSpotError,
    HubSpotRateLimited,
    HubSpotUnavailable,
    RefreshRejected,
)
from app.logs import redact_text
from app.metrics import count_hubspot_request
from app.settings import Settings

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/v3/token"  # noqa: S105 - a URL path, not a password
# HubSpot's 2026-03 token endpoint (the v3 one's shape), whose reference lists the client
# credentials grant the webhooks journal's app token needs; the v3 guide describes only
# the code and refresh grants, and v1 (an older journal guide's) stops working in 2027.
APP_TOKEN_PATH = "/oauth/2026-03/token"  # noqa: S105 - a URL path, not a password
INTROSPECT_PATH = "/oauth/v3/token/introspect"
REVOKE_PATH = "/oauth/v3/token/revoke"
APP_UNINSTALL_PATH = "/appinstalls/v3/external-install"
JOURNAL_SCOPE = "developer.webhooks_journal.read"
# A code exchange or refresh that takes longer than this is treated as a timeout.
TOKEN_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


@dataclass(frozen=True)
class TokenResponse:
    """A token endpoint's answer; the `Secret`s keep the tokens out of reprs and logs."""

    access_token: Secret
    refresh_token: Secret | None
    expires_in: float
    hub_id: int | None
    scopes: tuple[str, ...]


class _AsyncProtocol(OAuth2Client):  # type: ignore[misc]  # authlib is untyped
    """authlib's protocol client with its HTTP calls sent, awaited, through our httpx client."""

    async def _fetch_token(
        self,
        url: str,
        body: str = "",
        headers: dict[str, str] | None = None,
        auth: Any = None,
        method: str = "POST",
        **_kwargs: Any,
    ) -> Any:
        response = await self._http_post(url, body, auth=auth, headers=headers)
        return self._token_or_raise(response)

    async def _refresh_token(
        self,
        url: str,
        refresh_token: str | None = None,
        body: str = "",
        headers: dict[str, str] | None = None,
        auth: Any = None,
        **_kwargs: Any,
    ) -> Any:
        response = await self._http_post(url, body, auth=auth, headers=headers)
        token = self._token_or_raise(response, refresh=True)
        if "refresh_token" not in token:
            token["refresh_token"] = refresh_token
        return token

    async def _http_post(
        self,
        url: str,
        body: str | None = None,
        auth: Any = None,
        headers: dict[str, str] | None = None,
        **_kwargs: Any,
    ) -> httpx.Response:
        headers = dict(headers or {})
        body = body or ""
        if auth is not None:
            url, headers, body = auth.prepare("POST", url, headers, body)
        http: httpx.AsyncClient = self.session
        try:
            response = await http.post(
                url, data=dict(url_decode(body)), headers=headers, timeout=TOKEN_TIMEOUT
            )
        except httpx.TransportError as error:
            count_hubspot_request(httpx.URL(url).path, "error")
            # httpx's message names only the URL; the form body (and its secrets) stays out.
            raise HubSpotUnavailable(
                f"HubSpot's OAuth endpoint did not answer ({type(error).__name__})"
            ) from None
        count_hubspot_request(response.url.path, response.status_code)
        return response

    def _token_or_raise(self, response: httpx.Response, *, refresh: bool = False) -> Any:
        raise_for_token_error(response, refresh=refresh)
        return self.parse_response_token(response)


# HubSpot's words for a refresh token issued to another app's client id.
_NOT_THIS_CLIENT = "not issued to this client"


def error_body(response: httpx.Response) -> dict[str, Any]:
    """A failed answer's JSON object, or {} when it has none (an HTML error page, say)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def raise_for_token_error(response: httpx.Response, *, refresh: bool = False) -> None:
    """Classify a failed token-endpoint answer into the error tree."""
    if response.is_success:
        return
    body = error_body(response)
    error = str(body.get("error") or "")
    status_word = str(body.get("status") or "")
    context: dict[str, Any] = {
        "status_code": response.status_code,
        "category": error or status_word or None,
        "correlation_id": body.get("correlationId"),
    }
    if response.status_code == 429:
        raise HubSpotRateLimited(
            "HubSpot's OAuth endpoint is rate limiting",
            retry_after=retry_after(response),
            **context,
        )
    if response.status_code >= 500:
        raise HubSpotUnavailable("HubSpot's OAuth endpoint failed", **context)
    # As for every HubSpot error, its own words are the detail, not the text: the
    # category (`invalid_grant`, `invalid_client`, ...) says what went wrong.
    description = redact_text(str(body.get("error_description") or body.get("message") or ""))
    if error == "invalid_client" or _NOT_THIS_CLIENT in description.lower():
        # Refused for Hubline's own credentials: HubSpot answers a refresh token issued to
        # another app with BAD_REFRESH_TOKEN too, which read as an uninstall would delete
        # every portal's tokens after a deploy with the wrong HUBSPOT_CLIENT_ID.
        raise ClientRefused(
            "HubSpot's OAuth endpoint refused Hubline's client credentials: check "
            "HUBSPOT_CLIENT_ID and HUBSPOT_CLIENT_SECRET (no portal is uninstalled for this)",
            detail=description,
            **context,
        )
    if refresh and (error == "invalid_grant" or status_word == "BAD_REFRESH_TOKEN"):
        raise RefreshRejected(
            "HubSpot rejected the refresh token: the app was uninstalled or access revoked",
            detail=description,
            **context,
        )
    raise HubSpotAuthError(
        "HubSpot's OAuth endpoint refused the request", detail=description, **context
    )


# The longest Retry-After taken at its word: a larger one (or "inf") is a misreading, and
# waiting it out would hold the portal's events for good (a date overflows the schedule).
MAX_RETRY_AFTER = 3600.0


def retry_after(response: httpx.Response) -> float | None:
    """The seconds an answer's Retry-After asks for, at most an hour; None when it asks none."""
    try:
        seconds = float(response.headers["Retry-After"])
    except (KeyError, ValueError):  # absent, or an HTTP date: the backoff decides instead
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _as_token_response(token: Any) -> TokenResponse:
    hub_id = token.get("hub_id")
    scopes = token.get("scopes") or token.get("scope") or []
    if isinstance(scopes, str):
        scopes = scopes.split()
    refresh = token.get("refresh_token")
    return TokenResponse(
        access_token=Secret(str(token["access_token"])),
        refresh_token=Secret(str(refresh)) if refresh else None,
        expires_in=float(token.get("expires_in") or 1800),
        hub_id=int(hub_id) if hub_id is not None else None,
        scopes=tuple(str(scope) for scope in scopes),
    )


class HubSpotOAuth:
    """The app's OAuth client: one per operation is cheap, and keeps no token between calls."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = http

    def _protocol(self) -> _AsyncProtocol:
        return _AsyncProtocol(
            self._http,
            client_id=self._settings.hubspot_client_id,
            client_secret=self._settings.hubspot_client_secret.get_secret_value(),
            token_endpoint_auth_method="client_secret_post",  # noqa: S106 - a method name
            revocation_endpoint_auth_method="client_secret_post",
            redirect_uri=self._settings.redirect_uri,
            code_challenge_method="S256",
        )

    def _url(self, path: str) -> str:
        return self._settings.hubspot_api_url + path

    def authorization_url(self, *, state: str, code_verifier: str | None = None) -> str:
        """The authorize page URL: required and optional scopes, state, and PKCE when asked."""
        params: dict[str, str] = {"scope": " ".join(self._settings.required_scopes)}
        if self._settings.optional_scopes:
            params["optional_scope"] = " ".join(self._settings.optional_scopes)
        url, _ = self._protocol().create_authorization_url(
            self._settings.hubspot_auth_url + "/oauth/authorize",
            state=state,
            code_verifier=code_verifier,
            **params,
        )
        return str(url)

    async def exchange_code(self, code: str, *, code_verifier: str | None = None) -> TokenResponse:
        """The authorization-code grant; never retried (a code works once)."""
        extra = {"code_verifier": code_verifier} if code_verifier else {}
        token = await self._protocol().fetch_token(
            self._url(TOKEN_PATH), grant_type="authorization_code", code=code, **extra
        )
        return _as_token_response(token)

    async def refresh(self, refresh_token: Secret) -> TokenResponse:
        """One refresh grant (the caller retries and locks)."""
        token = await self._protocol().refresh_token(
            self._url(TOKEN_PATH), refresh_token=refresh_token.reveal()
        )
        return _as_token_response(token)

    async def client_credentials(self, scope: str = JOURNAL_SCOPE) -> TokenResponse:
        """An app-level token (not bound to a portal), for the webhooks journal."""
        token = await self._protocol().fetch_token(
            self._url(APP_TOKEN_PATH), grant_type="client_credentials", scope=scope
        )
        return _as_token_response(token)

    async def revoke(self, token: Secret, *, hint: str = "refresh_token") -> None:
        """Revoke a token; revoking does not uninstall the app."""
        response = await self._protocol().revoke_token(
            self._url(REVOKE_PATH), token=token.reveal(), token_type_hint=hint
        )
        raise_for_token_error(response)

    async def introspect(self, token: Secret, *, hint: str = "access_token") -> dict[str, Any]:
        """What HubSpot knows of a token: `active`, `hub_id`, `hub_domain`, `scopes`…"""
        response = await self._protocol().introspect_token(
            self._url(INTROSPECT_PATH), token=token.reveal(), token_type_hint=hint
        )
        raise_for_token_error(response)
        body = response.json()
        if not isinstance(body, dict):
            raise HubSpotError("HubSpot's introspection answer is not a JSON object")
        return body
