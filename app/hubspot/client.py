"""The one HubSpot client: every API call for a portal goes through `HubSpotClient.request`.

It owns the refresh middleware (its httpx auth), the portal's rate budget, waiting
and retrying on 429, retrying 5xx, 423 and timeouts with capped exponential backoff
and full jitter up to a bound, and turning what is left into the app's error tree
with the portal id, status, category and HubSpot's correlationId.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import httpx

from app.errors import (
    HubSpotAuthError,
    HubSpotConflict,
    HubSpotError,
    HubSpotRateLimited,
    HubSpotUnavailable,
    HubSpotValidationError,
)
from app.hubspot.auth import PortalAuth, TokenRefresher
from app.hubspot.oauth2 import error_body, retry_after
from app.logs import hubspot_error_fields, redact_text
from app.metrics import count_hubspot_request

if TYPE_CHECKING:
    from app.main import Services

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({423, 500, 502, 503, 504})
# Failures after which HubSpot may or may not have carried the request out.
AMBIGUOUS_STATUSES = frozenset({500, 502, 503, 504})
# Transport failures that prove the request never reached HubSpot.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# POSTs that only read, or write the same result however often they are repeated.
REPEATABLE_POST_SUFFIXES = (
    "/search",
    "/batch/read",
    "/batch/update",
    "/batch/upsert",
    "/batch/archive",
)
# HubSpot asks for at least two seconds after a 423 (a record is locked).
LOCKED_MINIMUM_WAIT = 2.0
# Set by the worker for a batch's task (and the tasks it starts): awaited right before each
# HubSpot write goes out, it raises when the worker no longer holds the portal. A worker
# that stalled past its lease would otherwise make again what another worker has since
# made in its stead: HubSpot takes a create from anyone holding the token.
before_write: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "hubspot_before_write", default=None
)
# Without Retry-After, a 429 waits at least this long before the portal sends again.
RATE_LIMITED_MINIMUM_WAIT = 1.0
# A 429 asking for a longer wait ends the call: its events wait in the inbox for their
# retry, rather than a worker holding their batch (and the portal) asleep in the call.
LONGEST_WAIT_IN_CALL = 60.0


class HubSpotClient:
    """HubSpot's API for one portal, as seen through Hubline's rules."""

    def __init__(
        self, services: Services, portal_id: int, *, allow_needs_reauth: bool = False
    ) -> None:
        self.portal_id = portal_id
        self._services = services
        self._runtime = services.hubspot
        self._base = services.settings.hubspot_api_url
        self._refresher = TokenRefresher(services, allow_needs_reauth=allow_needs_reauth)

    def __repr__(self) -> str:
        return f"HubSpotClient(portal_id={self.portal_id})"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        search: bool = False,
    ) -> httpx.Response:
        """Send one call, waiting and retrying as HubSpot asks; raises `HubSpotError`s."""
        backoff = self._runtime.backoff
        settings = self._services.settings
        limit = (
            settings.hubspot_searches_per_second if search else settings.hubspot_requests_per_10s
        )

        reads = method == "GET" or search or path.split("?", 1)[0].endswith("/batch/read")
        guard = None if reads else before_write.get()

        async def pace() -> None:
            await self._runtime.budget.acquire(self.portal_id, limit=limit, search=search)
            if guard is not None:  # after the budget's wait, which may be long
                await guard()

        auth = PortalAuth(self._refresher, self.portal_id, pace=pace)
        # A create that HubSpot may have carried out is never sent twice from here: the
        # caller's retry first checks what exists, so a retry cannot duplicate a record.
        repeatable = (
            method != "POST" or search or path.split("?", 1)[0].endswith(REPEATABLE_POST_SUFFIXES)
        )
        failures = 0
        rate_limited = 0
        while True:
            try:
                response = await self._services.http.request(
                    method, self._base + path, json=json, params=params, auth=auth
                )
            # A garbled answer (DecodingError) came back from a request HubSpot received:
            # like a lost one, it leaves open whether a create was carried out.
            except (httpx.TransportError, httpx.DecodingError) as error:
                count_hubspot_request(path, "error")
                failures += 1
                if not repeatable and not isinstance(error, NOT_SENT_ERRORS):
                    raise HubSpotUnavailable(
                        f"HubSpot did not answer {method} {_route(path)} ({type(error).__name__}); "
                        "it may have been carried out",
                        portal_id=self.portal_id,
                        ambiguous=True,
                    ) from None
                if failures >= backoff.api_attempts:
                    raise HubSpotUnavailable(
                        f"HubSpot did not answer {method} {_route(path)} ({type(error).__name__})",
                        portal_id=self.portal_id,
                    ) from None
                await self._wait(backoff.delay(failures), method, path, reason=type(error).__name__)
                continue
            self._runtime.budget.observe(self.portal_id, response.headers)
            count_hubspot_request(path, response.status_code)
            # The raw path may name a contact by email: the log redactor masks it.
            log.debug(
                "HubSpot %s %s answered %d",
                method,
                path,
                response.status_code,
                extra={"portal_id": self.portal_id},
            )
            if response.is_success:
                return response
            status = response.status_code
            if status == 429:
                rate_limited += 1
                failure = self._error(response, method, path)
                if rate_limited >= backoff.rate_limit_attempts:
                    raise self._gave_up(failure)
                wait = failure.retry_after or backoff.delay(
                    rate_limited, minimum=RATE_LIMITED_MINIMUM_WAIT
                )
                # Nothing more goes out for this portal until the wait is over.
                self._runtime.budget.block(self.portal_id, wait, search=search)
                if wait > LONGEST_WAIT_IN_CALL:
                    raise self._gave_up(failure)
                log.info(
                    "HubSpot answered 429; waiting %.2fs", wait, extra=hubspot_error_fields(failure)
                )
                continue
            if status in RETRYABLE_STATUSES:
                failures += 1
                failure = self._error(response, method, path)
                if not repeatable and status in AMBIGUOUS_STATUSES:
                    failure.ambiguous = True
                    raise self._gave_up(failure)
                if failures >= backoff.api_attempts:
                    raise self._gave_up(failure)
                minimum = LOCKED_MINIMUM_WAIT if status == 423 else 0.0
                await self._wait(
                    backoff.delay(failures, minimum=minimum),
                    method,
                    path,
                    reason=str(status),
                    failure=failure,
                )
                continue
            raise self._gave_up(self._error(response, method, path))

    async def _wait(
        self,
        seconds: float,
        method: str,
        path: str,
        *,
        reason: str,
        failure: HubSpotError | None = None,
    ) -> None:
        log.info(
            "HubSpot call %s %s failed (%s); retrying in %.2fs",
            method,
            _route(path),
            reason,
            seconds,
            extra={"portal_id": self.portal_id, **hubspot_error_fields(failure)},
        )
        await self._runtime.sleep(seconds)

    def _gave_up(self, failure: HubSpotError) -> HubSpotError:
        """Log the error answer the caller gets (with its correlationId), and return it."""
        log.info("HubSpot error: %s", failure, extra=hubspot_error_fields(failure))
        return failure

    def _error(self, response: httpx.Response, method: str, path: str) -> HubSpotError:
        return error_from_response(
            response, portal_id=self.portal_id, what=f"{method} {_route(path)}"
        )

    async def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET `path`; the answer's JSON (None for an empty answer). The same for the others."""
        return self._json(await self.request("GET", path, params=params))

    async def post_json(self, path: str, body: Any, *, search: bool = False) -> Any:
        return self._json(await self.request("POST", path, json=body, search=search))

    async def patch_json(self, path: str, body: Any) -> Any:
        return self._json(await self.request("PATCH", path, json=body))

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            # A success we cannot read: what a create made (its ids) is lost to us.
            request = response.request
            raise HubSpotUnavailable(
                f"HubSpot's answer to {request.method} {_route(request.url.path)} is not JSON; "
                "it may have been carried out",
                portal_id=self.portal_id,
                status_code=response.status_code,
                ambiguous=True,
            ) from None

    async def delete(self, path: str) -> None:
        await self.request("DELETE", path)


def hubspot_client(services: Services, portal_id: int) -> HubSpotClient:
    """The client for one portal (cheap: the shared state lives in `services.hubspot`)."""
    return HubSpotClient(services, portal_id)


# What an error says of HubSpot's answer. HubSpot's own message is never part of it: a
# refusal repeats the values we sent, and a 5xx may echo the whole request (names,
# summaries, a caller's words), which no pattern can find. The message is kept as the
# error's detail only, for code to read; the status, category and correlationId, which
# every error shows, are what an operator needs.
_SAYS = {
    400: "HubSpot refused the request",
    401: "HubSpot refused the access token",
    403: "HubSpot refused access (a scope or permission is missing)",
    404: "HubSpot found no such record",
    409: "HubSpot reports a conflict with an existing record",
    422: "HubSpot refused the request",
    423: "HubSpot reports the record locked",
    429: "HubSpot's rate limit was reached",
}


def error_from_response(
    response: httpx.Response, *, portal_id: int | None, what: str = "HubSpot call"
) -> HubSpotError:
    """The error-tree exception for a failed answer, with HubSpot's category and correlationId."""
    body = error_body(response)
    status = response.status_code
    category = body.get("category") or body.get("errorType") or body.get("policyName")
    raw_message = str(body.get("message") or response.reason_phrase or "error")
    detail = redact_text(raw_message)
    if status in _SAYS:
        message = _SAYS[status]
    elif status >= 500:
        message = "HubSpot failed with a server error"
    else:
        message = f"HubSpot answered {status}"
    kind: type[HubSpotError]
    if status == 429:
        kind = HubSpotRateLimited
    elif status in (401, 403):
        kind = HubSpotAuthError
    elif status == 409:
        kind = HubSpotConflict
    elif status >= 500 or status == 423:
        kind = HubSpotUnavailable
    elif status in (400, 422):
        kind = HubSpotValidationError
    else:
        kind = HubSpotError
    error = kind(
        f"{what}: {message}",
        portal_id=portal_id,
        status_code=status,
        category=str(category) if category else None,
        correlation_id=body.get("correlationId"),
        retry_after=retry_after(response),
        detail=detail,
    )
    if isinstance(error, HubSpotConflict):
        # Read before redaction: a long contact id looks like a phone number to the redactor.
        error.existing_id = HubSpotConflict.parse_existing_id(raw_message)
    return error


def _route(path: str) -> str:
    # Paths can hold an email (`/contacts/{email}?idProperty=email`): keep logs free of them.
    return redact_text(path.split("?", 1)[0])
