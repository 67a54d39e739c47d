"""The refresh middleware: an `httpx.Auth` flow that keeps a portal's access token fresh.

A token is refreshed when it expires within TOKEN_REFRESH_SKEW_SECONDS, once per
portal however many requests wait: an `asyncio.Lock` per portal inside the process,
and on PostgreSQL a lock on the portal's token row across processes (`SELECT … FOR
UPDATE`). After the lock the row is read again, so a refresh another process has just
made is used instead of repeated. SQLite locks only the whole database, which is not
held while HubSpot answers: there a version compare-and-swap settles two processes
refreshing at once. A 401 forces one refresh and one retry, never a loop.

Refresh failures are classified at once: `invalid_grant` means the app was
uninstalled (an uninstall signal goes into the inbox and `RefreshRejected` is
raised); 5xx, 429 and timeouts are retried with capped exponential backoff and
full jitter, leaving the stored tokens untouched, followed by a short cooldown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import TYPE_CHECKING

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from app.crypto import Secret
from app.errors import (
    HubSpotAuthError,
    HubSpotError,
    HubSpotUnavailable,
    PortalUnavailable,
    RefreshRejected,
)
from app.hubspot.oauth2 import HubSpotOAuth, TokenResponse
from app.logs import hubspot_error_fields
from app.metrics import TOKEN_REFRESHES, count_hubspot_request
from app.models import Portal, PortalStatus, utcnow
from app.tokens import TokenSet, load_tokens, store_tokens

if TYPE_CHECKING:
    from app.main import Services

log = logging.getLogger(__name__)

# How often a 401 may force a refresh of a token that is not about to expire.
FORCED_REFRESH_INTERVAL = 60.0


class TokenRefresher:
    """Hands out a portal's current access token, refreshing it when needed."""

    def __init__(self, services: Services, *, allow_needs_reauth: bool = False) -> None:
        self._services = services
        self._runtime = services.hubspot
        # Disconnecting must still reach HubSpot for a portal that needs re-consent.
        self._allow_needs_reauth = allow_needs_reauth

    async def access_token(self, portal_id: int, *, rejected: Secret | None = None) -> Secret:
        """A token to send; `rejected` is one HubSpot just answered 401 to (forces a refresh)."""
        tokens = await self._usable_tokens(portal_id)
        if self._fresh(tokens, rejected):
            return tokens.access_token
        async with self._runtime.refresh_lock(portal_id):
            return await self._refresh_locked(portal_id, rejected)

    def _may_force_refresh(self, tokens: TokenSet, rejected: Secret | None) -> bool:
        """Let a 401 force a refresh at most once a minute; True when this refresh is forced."""
        # Only for a token that is not expiring anyway. HubSpot: a 401 alone does not mean
        # a new token is needed. One that a token just refreshed meets too has another
        # cause, and refreshing for every such call would only load the token endpoint:
        # the call fails with the 401 instead.
        skew = self._services.settings.token_refresh_skew_seconds
        if rejected is None or tokens.expires_within(skew):
            return False
        runtime = self._runtime
        now = runtime.clock()
        last = runtime.forced_refresh_at.get(tokens.portal_id)
        if last is not None and now - last < FORCED_REFRESH_INTERVAL:
            raise HubSpotAuthError(
                "HubSpot refused a token refreshed moments ago; not refreshing it again yet",
                portal_id=tokens.portal_id,
                status_code=401,
            )
        runtime.forced_refresh_at[tokens.portal_id] = now
        return True

    async def _refresh(self, tokens: TokenSet, *, forced: bool) -> TokenResponse:
        """The refresh grant, retried; a forced one that got no token does not count as one."""
        try:
            return await self._refresh_with_retries(tokens)
        except HubSpotError as error:
            if forced and not isinstance(error, RefreshRejected):
                # No token came of it, so none was "refreshed moments ago": the next 401
                # may force a refresh again (the cooldown after failures paces them).
                self._runtime.forced_refresh_at.pop(tokens.portal_id, None)
            raise

    def _fresh(self, tokens: TokenSet, rejected: Secret | None) -> bool:
        skew = self._services.settings.token_refresh_skew_seconds
        if tokens.expires_within(skew):
            return False
        return rejected is None or tokens.access_token != rejected

    async def _usable_tokens(self, portal_id: int) -> TokenSet:
        """The stored tokens, or PortalUnavailable: no call is made for a portal we cannot serve."""
        settings = self._services.settings
        async with self._services.sessions() as session:
            portal = await session.get(Portal, portal_id, populate_existing=True)
            if portal is None or portal.status == PortalStatus.uninstalled:
                raise PortalUnavailable(portal_id, "not installed")
            if portal.status == PortalStatus.needs_reauth and not self._allow_needs_reauth:
                raise PortalUnavailable(portal_id, "needs re-authorization")
            missing = sorted(set(settings.required_scopes) - portal.scope_set)
            tokens = None
            if not missing:
                tokens = await load_tokens(portal_id, session=session, cipher=self._services.cipher)
        # The read session is closed before writing: on SQLite every transaction holds
        # the database's one write lock, so a writer opened inside it would wait forever.
        if missing and not self._allow_needs_reauth:
            from app.lifecycle import mark_needs_reauth  # lifecycle builds on this module

            async with self._services.sessions() as writer, writer.begin():
                await mark_needs_reauth(portal_id, missing, session=writer, settings=settings)
            raise PortalUnavailable(portal_id, "needs re-authorization")
        if missing:
            async with self._services.sessions() as session:
                tokens = await load_tokens(portal_id, session=session, cipher=self._services.cipher)
        if tokens is None:
            raise PortalUnavailable(portal_id, "no tokens stored")
        return tokens

    async def _refresh_locked(self, portal_id: int, rejected: Secret | None) -> Secret:
        runtime = self._runtime
        if runtime.refresh_cooldown_until.get(portal_id, 0.0) > runtime.clock():
            raise HubSpotUnavailable(
                "token refresh is cooling down after failed attempts", portal_id=portal_id
            )
        if self._services.engine.dialect.name == "sqlite":
            return await self._refresh_outside_transaction(portal_id, rejected)
        rejection: RefreshRejected | None = None
        async with self._services.sessions() as session, session.begin():
            tokens = await load_tokens(
                portal_id, session=session, cipher=self._services.cipher, for_update=True
            )
            if tokens is None:
                raise PortalUnavailable(portal_id, "no tokens stored")
            if self._fresh(tokens, rejected):
                return tokens.access_token  # another request or process refreshed meanwhile
            forced = self._may_force_refresh(tokens, rejected)
            try:
                answer = await self._refresh(tokens, forced=forced)
            except RefreshRejected as error:
                rejection = error
                await self._record_rejection(tokens, session=session)
            else:
                version = await self._store_refreshed(tokens, answer, session=session)
                if version is None:  # cannot happen under the row lock; say so if it does
                    log.warning("refreshed tokens lost a compare-and-swap", extra=_ctx(portal_id))
                log.info("refreshed the access token", extra=_ctx(portal_id))
                return answer.access_token
        assert rejection is not None
        raise rejection

    async def _refresh_outside_transaction(self, portal_id: int, rejected: Secret | None) -> Secret:
        """SQLite's refresh, which holds no transaction while HubSpot's token endpoint answers."""
        # SQLite's only lock is the whole database's, which intake, lease renewals and
        # every worker need within seconds; a token endpoint that hangs would hold it
        # through every retry (three tries of up to 10 s). Within the process the refresh
        # lock keeps this to one refresh; a process refreshing at the same moment costs
        # one refresh more, and the compare-and-swap on the row's version keeps the tokens
        # stored first.
        cipher = self._services.cipher
        async with self._services.sessions() as session:
            tokens = await load_tokens(portal_id, session=session, cipher=cipher)
        if tokens is None:
            raise PortalUnavailable(portal_id, "no tokens stored")
        if self._fresh(tokens, rejected):
            return tokens.access_token
        forced = self._may_force_refresh(tokens, rejected)
        try:
            answer = await self._refresh(tokens, forced=forced)
        except RefreshRejected:
            async with self._services.sessions() as session, session.begin():
                current = await load_tokens(portal_id, session=session, cipher=cipher)
                unchanged = current is not None and current.version == tokens.version
                if unchanged:
                    await self._record_rejection(tokens, session=session)
            if not unchanged and current is not None and self._fresh(current, rejected):
                return current.access_token  # refreshed or reinstalled meanwhile: not revoked
            raise
        async with self._services.sessions() as session, session.begin():
            version = await self._store_refreshed(tokens, answer, session=session)
        if version is None:
            # Stored meanwhile by another process (a refresh, a reinstall) or removed by
            # an uninstall: what is stored now is what to use.
            async with self._services.sessions() as session:
                current = await load_tokens(portal_id, session=session, cipher=cipher)
            if current is None:
                raise PortalUnavailable(portal_id, "no tokens stored")
            return current.access_token
        log.info("refreshed the access token", extra=_ctx(portal_id))
        return answer.access_token

    async def _store_refreshed(
        self, tokens: TokenSet, answer: TokenResponse, *, session: AsyncSession
    ) -> int | None:
        """Store a refresh's answer unless the row changed since `tokens` was read."""
        # HubSpot does not say whether a refresh rotates the refresh token: keep whatever
        # the answer carries, else the one that was just used.
        return await store_tokens(
            tokens.portal_id,
            access_token=answer.access_token.reveal(),
            refresh_token=(answer.refresh_token or tokens.refresh_token).reveal(),
            expires_in=answer.expires_in,
            install_generation=tokens.install_generation,
            session=session,
            cipher=self._services.cipher,
            expected_version=tokens.version,
        )

    async def _refresh_with_retries(self, tokens: TokenSet) -> TokenResponse:
        runtime = self._runtime
        oauth = HubSpotOAuth(self._services.settings, self._services.http)
        attempts = runtime.backoff.refresh_attempts
        for attempt in range(1, attempts + 1):
            try:
                answer = await oauth.refresh(tokens.refresh_token)
            except RefreshRejected as error:
                TOKEN_REFRESHES.labels(outcome="rejected").inc()
                error.portal_id = tokens.portal_id
                raise
            except HubSpotError as error:
                error.portal_id = tokens.portal_id
                transient = (
                    error.status_code is None
                    or error.status_code in (429,)
                    or (error.status_code >= 500)
                )
                if not transient:
                    TOKEN_REFRESHES.labels(outcome="refused").inc()
                    log.warning("token refresh refused", extra=hubspot_error_fields(error))
                    raise
                TOKEN_REFRESHES.labels(outcome="unavailable").inc()
                if attempt == attempts:
                    runtime.refresh_cooldown_until[tokens.portal_id] = (
                        runtime.clock() + runtime.backoff.refresh_cooldown_seconds
                    )
                    log.warning(
                        "token refresh failed %d times; cooling down",
                        attempts,
                        extra=hubspot_error_fields(error),
                    )
                    raise
                delay = runtime.backoff.delay(attempt, minimum=error.retry_after or 0.0)
                log.info(
                    "token refresh failed; retrying in %.2fs",
                    delay,
                    extra=hubspot_error_fields(error),
                )
                await runtime.sleep(delay)
            else:
                TOKEN_REFRESHES.labels(outcome="success").inc()
                return answer
        raise AssertionError("unreachable")

    async def _record_rejection(self, tokens: TokenSet, *, session: AsyncSession) -> None:
        """invalid_grant: signal the uninstall, and apply it now in this locked transaction."""
        # Applying it here (with the handler's own function) matters: the worker parks a
        # portal's pending events when a handler raises RefreshRejected, which would park
        # the signal itself before the uninstall handler could run.
        from app.lifecycle import UninstallReason, apply_uninstall, signal_uninstall

        log.warning(
            "HubSpot rejected the refresh token: uninstalling", extra=_ctx(tokens.portal_id)
        )
        await signal_uninstall(
            tokens.portal_id,
            reason=UninstallReason.refresh_rejected,
            install_generation=tokens.install_generation,
            occurred_at=utcnow(),
            session=session,
            cipher=self._services.cipher,
        )
        await apply_uninstall(
            tokens.portal_id,
            install_generation=tokens.install_generation,
            occurred_at=None,
            session=session,
        )


def _ctx(portal_id: int) -> dict[str, object]:
    return {"portal_id": portal_id}


Pace = Callable[[], Awaitable[None]]


class PortalAuth(httpx.Auth):
    """Bearer auth for one portal: fresh token, one refresh-and-retry on a 401."""

    def __init__(self, refresher: TokenRefresher, portal_id: int, *, pace: Pace) -> None:
        self._refresher = refresher
        self._portal_id = portal_id
        self._pace = pace

    def __repr__(self) -> str:
        return f"PortalAuth(portal_id={self._portal_id})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("PortalAuth is async-only: use httpx.AsyncClient")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._refresher.access_token(self._portal_id)
        request.headers["Authorization"] = f"Bearer {token.reveal()}"
        await self._pace()
        response = yield request
        if response.status_code != 401:
            return
        # The client counts the answer it is handed; this one is replaced by the retry's.
        count_hubspot_request(request.url.path, 401)
        log.info("HubSpot answered 401: refreshing once and retrying", extra=_ctx(self._portal_id))
        token = await self._refresher.access_token(self._portal_id, rejected=token)
        request.headers["Authorization"] = f"Bearer {token.reveal()}"
        await self._pace()
        yield request
