"""OAuth: the authorize page, token endpoints (code, refresh, client credentials), introspect,
revoke and the app-initiated uninstall."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from app.sandbox.config import APP_SCOPES
from app.sandbox.errors import ApiError, oauth_error
from app.sandbox.gateway import ApiContext, api_route, json_response, random_token
from app.sandbox.state import AccessToken, AuthCode, RefreshToken, SandboxState
from app.sandbox.ui import render


@dataclass
class AuthorizeRequest:
    """A validated authorize request."""

    client_id: str
    redirect_uri: str
    scopes: list[str]
    optional_scopes: list[str]
    state: str | None
    code_challenge: str | None
    code_challenge_method: str | None

    def hidden_fields(self) -> dict[str, str]:
        """The request as form fields for the approve and deny buttons."""
        fields = {
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.scopes),
            "optional_scope": " ".join(self.optional_scopes),
        }
        if self.state is not None:
            fields["state"] = self.state
        if self.code_challenge is not None:
            fields["code_challenge"] = self.code_challenge
            fields["code_challenge_method"] = self.code_challenge_method or ""
        return fields


class AuthorizeError(Exception):
    """A problem that must not redirect (unknown client, bad redirect URI): an error page."""


def _split_scopes(raw: str | None) -> list[str]:
    return list(dict.fromkeys((raw or "").replace("+", " ").split()))


def _valid_redirect_uri(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment


def parse_authorize(state: SandboxState, params: dict[str, str]) -> AuthorizeRequest:
    """Validate authorize parameters; AuthorizeError for the ones that cannot redirect."""
    config = state.config
    client_id = params.get("client_id", "")
    if client_id != config.client_id:
        raise AuthorizeError(f"Unknown client_id {client_id!r}: no app has that client id.")
    redirect_uri = params.get("redirect_uri", "")
    if not _valid_redirect_uri(redirect_uri):
        raise AuthorizeError(f"The redirect_uri {redirect_uri!r} is not a valid absolute URL.")
    if config.redirect_uris is not None and redirect_uri not in config.redirect_uris:
        raise AuthorizeError(f"The redirect_uri {redirect_uri!r} is not registered for this app.")
    scopes = _split_scopes(params.get("scope"))
    if not scopes:
        raise AuthorizeError("The authorize request has no scope.")
    challenge = params.get("code_challenge") or None
    return AuthorizeRequest(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scopes=scopes,
        optional_scopes=[s for s in _split_scopes(params.get("optional_scope")) if s not in scopes],
        state=params.get("state") or None,
        code_challenge=challenge,
        code_challenge_method=(params.get("code_challenge_method") or "plain")
        if challenge
        else None,
    )


def with_query(url: str, params: dict[str, str]) -> str:
    """`url` with `params` added to its query string."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redirect_error(request: AuthorizeRequest, error: str, description: str) -> Response:
    params = {"error": error, "error_description": description}
    if request.state is not None:
        params["state"] = request.state
    return RedirectResponse(with_query(request.redirect_uri, params), status_code=302)


def _form_params(form: FormData) -> dict[str, str]:
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def authorize_page(request: Request) -> Response:
    """HubSpot's install page: pick a portal and approve."""
    state: SandboxState = request.app.state.sandbox
    try:
        auth = parse_authorize(state, dict(request.query_params))
    except AuthorizeError as error:
        return render(
            request, "error.html", {"title": "Can't install this app", "message": str(error)}, 400
        )
    portals = [
        {
            "world": world,
            "missing": [s for s in auth.scopes if s not in world.portal.scopes],
            "dropped": [s for s in auth.optional_scopes if s not in world.portal.scopes],
        }
        for world in state.portals.values()
    ]
    return render(request, "authorize.html", {"auth": auth, "portals": portals})


async def approve(request: Request) -> Response:
    """The Approve button: issue a code and redirect back to the app."""
    state: SandboxState = request.app.state.sandbox
    params = _form_params(await request.form())
    try:
        auth = parse_authorize(state, params)
    except AuthorizeError as error:
        return render(
            request, "error.html", {"title": "Can't install this app", "message": str(error)}, 400
        )
    try:
        world = state.portals[int(params.get("portal_id", ""))]
    except (KeyError, ValueError):
        return render(
            request,
            "error.html",
            {"title": "Unknown account", "message": "Pick one of the listed accounts."},
            400,
        )
    if auth.code_challenge is not None and auth.code_challenge_method != "S256":
        return _redirect_error(auth, "invalid_request", "code_challenge_method must be S256")
    missing = [s for s in auth.scopes if s not in world.portal.scopes]
    if missing:
        return _redirect_error(
            auth,
            "invalid_scope",
            f"This account's tier can't grant the required scopes: {' '.join(missing)}",
        )
    granted = [*auth.scopes, *(s for s in auth.optional_scopes if s in world.portal.scopes)]
    code = AuthCode(
        code=random_token(),
        client_id=auth.client_id,
        redirect_uri=auth.redirect_uri,
        portal_id=world.portal_id,
        scopes=granted,
        code_challenge=auth.code_challenge,
        expires_at=state.now() + state.config.code_lifetime,
    )
    state.codes[code.code] = code
    state.mark_installed(world, granted)
    params_out = {"code": code.code}
    if auth.state is not None:
        params_out["state"] = auth.state
    return RedirectResponse(with_query(auth.redirect_uri, params_out), status_code=302)


async def deny(request: Request) -> Response:
    """The Deny button: redirect back with access_denied."""
    state: SandboxState = request.app.state.sandbox
    try:
        auth = parse_authorize(state, _form_params(await request.form()))
    except AuthorizeError as error:
        return render(
            request, "error.html", {"title": "Can't install this app", "message": str(error)}, 400
        )
    return _redirect_error(auth, "access_denied", "The user denied the install request.")


def _check_client(state: SandboxState, form: dict[str, str]) -> None:
    # HubSpot wants the client credentials in the body (client_secret_post), not in Basic auth.
    if form.get("client_id") != state.config.client_id:
        raise oauth_error("BAD_CLIENT_ID", "invalid_client", "missing or unknown client_id")
    secret = form.get("client_secret", "")
    if not hmac.compare_digest(secret.encode(), state.config.client_secret.encode()):
        raise oauth_error("BAD_CLIENT_SECRET", "invalid_client", "client_secret does not match")


def _token_answer(
    state: SandboxState, access: AccessToken, refresh: RefreshToken | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token_type": "bearer",
        "access_token": access.token,
        "expires_in": int(access.expires_at - access.issued_at),
        "scopes": list(access.scopes),
        "token_use": "access_token",
    }
    if refresh is not None:
        body["refresh_token"] = refresh.token
    if access.portal_id is not None:
        body["hub_id"] = access.portal_id
    return body


def _pkce_ok(challenge: str, verifier: str) -> bool:
    digest = hashlib.sha256(verifier.encode()).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(expected, challenge)


def _exchange_code(state: SandboxState, form: dict[str, str]) -> dict[str, Any]:
    code = state.codes.get(form.get("code", ""))
    if code is None:
        raise oauth_error("BAD_AUTH_CODE", "invalid_grant", "missing or unknown auth code")
    if code.used:
        raise oauth_error("BAD_AUTH_CODE", "invalid_grant", "auth code has already been used")
    if code.expires_at <= state.now():
        raise oauth_error("BAD_AUTH_CODE", "invalid_grant", "auth code is expired")
    if form.get("redirect_uri") != code.redirect_uri:
        raise oauth_error(
            "BAD_REDIRECT_URI", "invalid_grant", "redirect_uri does not match the authorize request"
        )
    if code.code_challenge is not None:
        verifier = form.get("code_verifier", "")
        if not verifier or not _pkce_ok(code.code_challenge, verifier):
            raise oauth_error("BAD_CODE_VERIFIER", "invalid_grant", "code_verifier does not match")
    code.used = True
    access, refresh = state.issue_tokens(code.portal_id, code.scopes)
    state.exchange_count[code.portal_id] += 1
    return _token_answer(state, access, refresh)


def _refresh(state: SandboxState, form: dict[str, str]) -> dict[str, Any]:
    refresh = state.refresh_tokens.get(form.get("refresh_token", ""))
    if refresh is None or refresh.revoked:
        raise oauth_error("BAD_REFRESH_TOKEN", "invalid_grant", "missing or unknown refresh token")
    if refresh.client_id and refresh.client_id != form.get("client_id"):
        # Another app's client (the sandbox's app credentials changed since the install).
        raise oauth_error(
            "BAD_REFRESH_TOKEN", "invalid_grant", "refresh token was not issued to this client"
        )
    if state.config.rotate_refresh_tokens:
        refresh.revoked = True
        access, refresh = state.issue_tokens(refresh.portal_id, refresh.scopes)
    else:
        access = state.issue_access_token(refresh.portal_id, refresh.scopes, refresh.token)
    state.refresh_count[refresh.portal_id] += 1
    return _token_answer(state, access, refresh)


def _client_credentials(state: SandboxState, form: dict[str, str]) -> dict[str, Any]:
    scopes = _split_scopes(form.get("scope")) or ["developer.webhooks_journal.read"]
    unknown = [s for s in scopes if s not in APP_SCOPES]
    if unknown:
        raise oauth_error(
            "BAD_SCOPE", "invalid_scope", f"scopes not available to an app token: {unknown}"
        )
    return _token_answer(state, state.issue_access_token(None, scopes, None), None)


async def token(request: Request, ctx: ApiContext) -> Response:
    """POST /oauth/v3/token (and /v1, /2026-03): every grant."""
    state = ctx.state
    form = _form_params(await request.form())
    _check_client(state, form)
    grant = form.get("grant_type")
    if grant == "authorization_code":
        body = _exchange_code(state, form)
    elif grant == "refresh_token":
        body = _refresh(state, form)
    elif grant == "client_credentials":
        body = _client_credentials(state, form)
    else:
        raise oauth_error(
            "BAD_GRANT_TYPE", "unsupported_grant_type", f"unknown grant_type {grant!r}"
        )
    ctx.portal_id = body.get("hub_id")
    return json_response(body, headers={"Cache-Control": "no-store"})


def _describe(state: SandboxState, raw: str) -> dict[str, Any]:
    now = state.now()
    access = state.access_tokens.get(raw)
    if access is not None and not access.revoked and access.expires_at > now:
        body: dict[str, Any] = {
            "active": True,
            "token_type": "access_token",
            "client_id": state.config.client_id,
            "app_id": state.config.app_id,
            "scopes": list(access.scopes),
            "expires_in": int(access.expires_at - now),
        }
        if access.portal_id is not None:
            body |= _portal_fields(state, access.portal_id)
        return body
    refresh = state.refresh_tokens.get(raw)
    if refresh is not None and not refresh.revoked:
        return {
            "active": True,
            "token_type": "refresh_token",
            "client_id": state.config.client_id,
            "app_id": state.config.app_id,
            "scopes": list(refresh.scopes),
            **_portal_fields(state, refresh.portal_id),
        }
    return {"active": False}


def _portal_fields(state: SandboxState, portal_id: int) -> dict[str, Any]:
    domain = state.portals[portal_id].portal.hub_domain
    return {"hub_id": portal_id, "hub_domain": domain, "user": f"admin@{domain}", "user_id": 1}


async def introspect(request: Request, ctx: ApiContext) -> Response:
    """POST /oauth/v3/token/introspect."""
    form = _form_params(await request.form())
    _check_client(ctx.state, form)
    body = _describe(ctx.state, form.get("token", ""))
    ctx.portal_id = body.get("hub_id")
    return json_response(body)


async def revoke(request: Request, ctx: ApiContext) -> Response:
    """POST /oauth/v3/token/revoke: revoking never uninstalls."""
    state = ctx.state
    form = _form_params(await request.form())
    _check_client(state, form)
    raw = form.get("token", "")
    refresh = state.refresh_tokens.get(raw)
    if refresh is not None:
        refresh.revoked = True
        ctx.portal_id = refresh.portal_id
        for access in state.access_tokens.values():
            if access.refresh_token == raw:
                access.revoked = True
    access_token = state.access_tokens.get(raw)
    if access_token is not None:
        access_token.revoked = True
        ctx.portal_id = access_token.portal_id
    # Unknown tokens are not an error (RFC 7009).
    return Response(status_code=200)


async def legacy_access_token(request: Request, ctx: ApiContext) -> Response:
    """GET /oauth/v1/access-tokens/{token}: the v1 token metadata."""
    raw = request.path_params["token"]
    described = _describe(ctx.state, raw)
    if not described["active"] or described["token_type"] != "access_token":  # noqa: S105
        raise ApiError(404, {"status": "error", "message": "Access token not found or expired"})
    ctx.portal_id = described.get("hub_id")
    return json_response(
        {
            "token": raw,
            "user": described.get("user"),
            "hub_domain": described.get("hub_domain"),
            "scopes": described["scopes"],
            "hub_id": described.get("hub_id"),
            "app_id": described["app_id"],
            "expires_in": described["expires_in"],
            "user_id": described.get("user_id"),
            "token_type": "access",
        }
    )


async def legacy_refresh_token(request: Request, ctx: ApiContext) -> Response:
    """GET or DELETE /oauth/v1/refresh-tokens/{token}."""
    raw = request.path_params["token"]
    refresh = ctx.state.refresh_tokens.get(raw)
    if refresh is None or refresh.revoked:
        raise ApiError(404, {"status": "error", "message": "Refresh token not found"})
    ctx.portal_id = refresh.portal_id
    if request.method == "DELETE":
        refresh.revoked = True
        return Response(status_code=204)
    described = _describe(ctx.state, raw)
    return json_response(
        {
            "token": raw,
            "user": described.get("user"),
            "hub_domain": described.get("hub_domain"),
            "scopes": described["scopes"],
            "hub_id": described.get("hub_id"),
            "client_id": described["client_id"],
            "user_id": described.get("user_id"),
            "token_type": "refresh",
        }
    )


async def external_uninstall(request: Request, ctx: ApiContext) -> Response:
    """DELETE /appinstalls/v3/external-install: the app uninstalls itself from the portal."""
    ctx.state.uninstall(ctx.portal.portal_id)
    return Response(status_code=204)


def routes() -> list[BaseRoute]:
    """The OAuth routes."""
    found: list[BaseRoute] = [
        Route("/oauth/authorize", authorize_page, methods=["GET"]),
        Route("/oauth/authorize/approve", approve, methods=["POST"]),
        Route("/oauth/authorize/deny", deny, methods=["POST"]),
        api_route(
            "/oauth/v1/access-tokens/{token}", legacy_access_token, methods=["GET"], auth="none"
        ),
        api_route(
            "/oauth/v1/refresh-tokens/{token}",
            legacy_refresh_token,
            methods=["GET", "DELETE"],
            auth="none",
        ),
        api_route("/appinstalls/v3/external-install", external_uninstall, methods=["DELETE"]),
    ]
    for version in ("v1", "v3", "2026-03"):
        found.append(api_route(f"/oauth/{version}/token", token, methods=["POST"], auth="none"))
    for version in ("v3", "2026-03"):
        found.append(
            api_route(
                f"/oauth/{version}/token/introspect", introspect, methods=["POST"], auth="none"
            )
        )
        found.append(
            api_route(f"/oauth/{version}/token/revoke", revoke, methods=["POST"], auth="none")
        )
    return found
