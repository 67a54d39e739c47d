"""What every emulated API request goes through: latency, faults, auth, rate limits, logging.

Order matters and follows HubSpot: a fault answers before anything else; authentication
comes before the per-portal limits (which need the portal); the handler runs last and its
`ApiError`s become HubSpot-shaped JSON.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.sandbox.errors import ApiError, correlation_id, hubspot_error, missing_scopes
from app.sandbox.limits import take_fault
from app.sandbox.properties import iso
from app.sandbox.state import AccessToken, PortalWorld, RequestRecord, SandboxState

Auth = Literal["portal", "app", "none"]

INVALID_AUTH_MESSAGE = (
    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you "
    "can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview"
)


@dataclass
class ApiContext:
    """What a handler knows about the caller."""

    state: SandboxState
    token: AccessToken | None
    world: PortalWorld | None
    portal_id: int | None = None

    @property
    def portal(self) -> PortalWorld:
        """The caller's portal (portal-authenticated endpoints only)."""
        if self.world is None:
            raise hubspot_error(401, "INVALID_AUTHENTICATION", INVALID_AUTH_MESSAGE)
        return self.world

    def require_scope(self, *any_of: str) -> None:
        """403 MISSING_SCOPES unless the token carries one of these scopes."""
        if self.token is None or not set(any_of) & set(self.token.scopes):
            raise missing_scopes(list(any_of))


Handler = Callable[[Request, ApiContext], Awaitable[Response]]


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON answer."""
    return JSONResponse(body, status_code=status_code, headers=headers)


def batch_answer(
    started: float,
    results: list[dict[str, Any]],
    now: float,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """HubSpot's answer to a batch call: results, timings, and the errors if any."""
    body: dict[str, Any] = {
        "status": "COMPLETE",
        "results": results,
        "startedAt": iso(started),
        "completedAt": iso(now),
    }
    if errors:
        body["numErrors"] = len(errors)
        body["errors"] = errors
    return body


def error_response(error: ApiError) -> Response:
    """The JSON answer for an `ApiError`."""
    return JSONResponse(error.body, status_code=error.status_code, headers=error.headers)


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body (400 when it is not one)."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise hubspot_error(400, "VALIDATION_ERROR", "Invalid input JSON on line 1") from None
    if not isinstance(body, dict):
        raise hubspot_error(400, "VALIDATION_ERROR", "The request body must be a JSON object")
    return body


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _authenticate(state: SandboxState, raw: str | None, auth: Auth) -> AccessToken | None:
    if auth == "none":
        return None
    token = state.access_tokens.get(raw) if raw else None
    if token is None or token.revoked:
        raise hubspot_error(401, "INVALID_AUTHENTICATION", INVALID_AUTH_MESSAGE)
    now = state.now()
    if token.expires_at <= now:
        minutes = int((now - token.expires_at) // 60)
        raise hubspot_error(
            401,
            "EXPIRED_AUTHENTICATION",
            f"The OAuth token used to make this call expired {minutes} minute(s) ago.",
        )
    if auth == "portal" and token.is_app_token:
        raise hubspot_error(
            401,
            "INVALID_AUTHENTICATION",
            "This call needs an access token for an installed account.",
        )
    if auth == "app" and not token.is_app_token:
        raise missing_scopes(["developer.webhooks_journal.read"])
    return token


def _rate_limit(state: SandboxState, portal_id: int, search: bool) -> dict[str, str]:
    """Count the request against its portal's limit; 429 when over it. Answer the limit headers."""
    config = state.config
    now = state.now()
    if search:
        allowed, _ = state.search_window.acquire(portal_id, config.searches_per_second, now)
        if not allowed:
            raise _too_many(state, "You have reached your secondly limit.", "SECONDLY", {})
        return {}
    allowed, remaining = state.request_window.acquire(portal_id, config.requests_per_10s, now)
    if config.requests_per_10s is None:
        return {}
    headers = {
        "X-HubSpot-RateLimit-Max": str(config.requests_per_10s),
        "X-HubSpot-RateLimit-Remaining": str(remaining),
        "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
    }
    if not allowed:
        raise _too_many(
            state,
            "You have reached your ten_secondly_rolling limit.",
            "TEN_SECONDLY_ROLLING",
            headers,
        )
    return headers


def _too_many(state: SandboxState, message: str, policy: str, headers: dict[str, str]) -> ApiError:
    body = {
        "status": "error",
        "message": message,
        "errorType": "RATE_LIMIT",
        "correlationId": correlation_id(),
        "policyName": policy,
    }
    if state.config.send_retry_after:
        headers = {**headers, "Retry-After": "1"}
    return ApiError(429, body, headers)


def _endpoint_name(request: Request, path: str) -> str:
    # Fill in the object type so counts tell contacts from calls.
    params = request.path_params
    for name in ("object_type", "action"):
        if name in params:
            path = path.replace("{" + name + "}", str(params[name]))
    return f"{request.method} {path}"


def _logged_path(request: Request) -> str:
    # Legacy token endpoints carry a token in the path; the traffic view must not show it.
    token = request.path_params.get("token")
    path = request.url.path
    return path.replace(str(token), "[redacted]") if token else path


def api_route(
    path: str, handler: Handler, *, methods: list[str], auth: Auth = "portal", search: bool = False
) -> Route:
    """A route for an emulated HubSpot API endpoint."""

    async def endpoint(request: Request) -> Response:
        state: SandboxState = request.app.state.sandbox
        started = time.perf_counter()
        raw_token = _bearer(request)
        known = state.access_tokens.get(raw_token) if raw_token else None
        ctx = ApiContext(state, None, None, known.portal_id if known else None)
        try:
            response = await _serve(request, handler, ctx, auth=auth, search=search)
        except ApiError as error:
            response = error_response(error)
        state.record_request(
            RequestRecord(
                at=state.now(),
                portal_id=ctx.portal_id,
                method=request.method,
                path=_logged_path(request),
                endpoint=_endpoint_name(request, path),
                status=response.status_code,
                duration_ms=(time.perf_counter() - started) * 1000,
                search=search,
            )
        )
        return response

    return Route(path, endpoint, methods=methods)


async def _serve(
    request: Request, handler: Handler, ctx: ApiContext, *, auth: Auth, search: bool
) -> Response:
    state = ctx.state
    if state.config.latency_seconds > 0:
        await asyncio.sleep(state.config.latency_seconds)
    fault = take_fault(state.faults, ctx.portal_id, request.url.path)
    if fault is not None:
        if fault.hang_seconds > 0:
            await asyncio.sleep(fault.hang_seconds)
        raise hubspot_error(
            fault.status, "SANDBOX_INJECTED_FAULT", f"Injected fault {fault.status}"
        )
    ctx.token = _authenticate(state, _bearer(request), auth)
    rate_headers: dict[str, str] = {}
    if ctx.token is not None and ctx.token.portal_id is not None:
        ctx.world = state.portals.get(ctx.token.portal_id)
        rate_headers = _rate_limit(state, ctx.token.portal_id, search)
    try:
        response = await handler(request, ctx)
    except ApiError as error:
        response = error_response(error)
    response.headers.update(rate_headers)
    return response


def random_token(nbytes: int = 32) -> str:
    """An unguessable URL-safe token."""
    return secrets.token_urlsafe(nbytes)
