"""A portal's life: install and reinstall, scope checks, and every way it ends.

Every uninstall signal becomes an `app.uninstall` event in the inbox, handled by
`apply_uninstall`: entries read from HubSpot's webhooks journal (the only place
HubSpot reports an uninstall), a refresh answered `invalid_grant`, and a
disconnect. An uninstall deletes the tokens, marks the portal `uninstalled` and
parks its pending events; a signal older than the current install generation is
ignored, so a late signal never wipes a fresh reinstall.

Data functions take `*, session` and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import httpx
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import Secret, TokenCipher
from app.db import transaction
from app.errors import (
    ClientRefused,
    HubSpotError,
    HubSpotNotReached,
    HubSpotRateLimited,
    HubSpotUnavailable,
    PortalUnavailable,
)
from app.hubspot.client import HubSpotClient, error_from_response
from app.hubspot.oauth2 import APP_UNINSTALL_PATH, JOURNAL_SCOPE, HubSpotOAuth, TokenResponse
from app.hubspot.runtime import AppToken
from app.hubspot.times import moment
from app.inbox import (
    Done,
    EventView,
    HandlerContext,
    NewEvent,
    Outcome,
    enqueue,
    park_portal_events,
    registry,
    unpark_portal_events,
)
from app.metrics import count_hubspot_request
from app.models import (
    AppState,
    EventSource,
    OAuthToken,
    Portal,
    PortalProblem,
    PortalStatus,
    utcnow,
)
from app.portals import clear_problem, create_secret, current_secret, record_problem
from app.settings import Settings
from app.tokens import delete_tokens, load_tokens, store_tokens

if TYPE_CHECKING:
    from app.main import Services
    from app.worker import Worker

log = logging.getLogger(__name__)

UNINSTALL_EVENT = "app.uninstall"
PROVISION_EVENT = "properties.provision"
NEEDS_REAUTH_PROBLEM = "needs_reauth"

JOURNAL_PATH = "/webhooks-journal/journal/2026-03"
JOURNAL_OFFSET_KEY = "journal_offset"
JOURNAL_BATCH = 100
# One poll reads at most this many batches, so a long backlog cannot hold the lease forever.
JOURNAL_MAX_BATCHES = 20
UNINSTALL_EVENT_TYPE_ID = "4-1916193"
UNINSTALL_ACTIONS = frozenset({"APP_UNINSTALL", "APP_UNINSTALLED", "UNINSTALL", "UNINSTALLED"})


class UninstallReason(StrEnum):
    journal = "journal"
    refresh_rejected = "refresh_rejected"
    disconnect = "disconnect"


def webhook_url(settings: Settings, portal_id: int) -> str:
    """Where the portal's receptionist sends its events."""
    return f"{settings.public_url}/webhooks/portals/{portal_id}/receptionist"


def install_url(settings: Settings) -> str:
    """Where an install starts: at PUBLIC_URL, the host HubSpot sends the browser back to."""
    # The install binds its state to a cookie of the host it starts on; started on another
    # name of the same server (127.0.0.1 for localhost), the callback would find none.
    return f"{settings.public_url}/oauth/install"


def reauth_url(settings: Settings) -> str:
    """The link that asks the portal's admin to consent again (to the scopes now required)."""
    return install_url(settings)


# --- install ------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallOutcome:
    portal: Portal
    secret: Secret
    reinstall: bool


async def record_install(
    portal_id: int,
    tokens: TokenResponse,
    *,
    hub_domain: str,
    settings: Settings,
    session: AsyncSession,
    cipher: TokenCipher,
) -> InstallOutcome:
    """Store an install or reinstall: portal, tokens, secret and provisioning, all or nothing.

    A reinstall starts a new install generation, replaces the tokens, keeps the
    receptionist secret (the admin need not reconfigure the receptionist) and
    resumes the portal's parked events.
    """
    if tokens.refresh_token is None:
        raise HubSpotError("HubSpot's token answer has no refresh token", portal_id=portal_id)
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    created = (
        await session.execute(
            insert(Portal)
            .values(
                portal_id=portal_id,
                install_generation=0,
                status=PortalStatus.active,
                installed_at=utcnow(),
                created_at=utcnow(),
                updated_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["portal_id"])
            .returning(col(Portal.portal_id))
        )
    ).scalar_one_or_none()
    portal = await _portal_for_update(portal_id, session=session)
    assert portal is not None
    now = utcnow()
    missing = sorted(set(settings.required_scopes) - set(tokens.scopes))
    portal.install_generation += 1
    portal.status = PortalStatus.needs_reauth if missing else PortalStatus.active
    portal.scopes = " ".join(tokens.scopes)
    portal.hub_domain = hub_domain or portal.hub_domain
    portal.installed_at = now
    portal.uninstalled_at = None
    portal.updated_at = now
    await session.flush()
    await store_tokens(
        portal_id,
        access_token=tokens.access_token.reveal(),
        refresh_token=tokens.refresh_token.reveal(),
        expires_in=tokens.expires_in,
        install_generation=portal.install_generation,
        session=session,
        cipher=cipher,
    )
    secret = await current_secret(portal_id, session=session, cipher=cipher)
    if secret is None:
        secret = await create_secret(portal_id, session=session, cipher=cipher)
    await enqueue(
        NewEvent(
            portal_id=portal_id,
            source=EventSource.internal,
            type=PROVISION_EVENT,
            idempotency_key=f"{PROVISION_EVENT}:{portal.install_generation}",
            occurred_at=now,
            payload={"install_generation": portal.install_generation},
        ),
        session=session,
        cipher=cipher,
    )
    if missing:
        await mark_needs_reauth(portal_id, missing, session=session, settings=settings)
    else:
        await clear_problem(portal_id, NEEDS_REAUTH_PROBLEM, session=session)
        resumed = await unpark_portal_events(portal_id, session=session)
        if resumed:
            log.info("resumed %d parked events", resumed, extra={"portal_id": portal_id})
    return InstallOutcome(portal, secret, reinstall=created is None)


async def _portal_for_update(portal_id: int, *, session: AsyncSession) -> Portal | None:
    """The portal's row, locked, after its token row: the order every path takes them in."""
    # A token refresh holds the token row while HubSpot answers, and on a rejection then
    # takes the portal row to record the uninstall: taking the portal row first here,
    # an install or uninstall meeting it would deadlock. On SQLite every transaction
    # already holds the single write lock.
    await session.execute(
        sa.select(col(OAuthToken.portal_id))
        .where(col(OAuthToken.portal_id) == portal_id)
        .with_for_update()
    )
    query = sa.select(Portal).where(col(Portal.portal_id) == portal_id).with_for_update()
    result = await session.execute(query.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


# --- scopes -------------------------------------------------------------------------


async def mark_needs_reauth(
    portal_id: int, missing: list[str], *, session: AsyncSession, settings: Settings
) -> None:
    """The portal lacks scopes this version requires: park its work until it consents again."""
    portal = await _portal_for_update(portal_id, session=session)
    if portal is None or portal.status == PortalStatus.uninstalled:
        return
    if portal.status != PortalStatus.needs_reauth:
        log.warning(
            "portal lacks required scopes: needs re-authorization",
            extra={"portal_id": portal_id, "missing_scopes": missing},
        )
    portal.status = PortalStatus.needs_reauth
    portal.updated_at = utcnow()
    await record_problem(
        portal_id,
        NEEDS_REAUTH_PROBLEM,
        "Hubline needs permissions this portal has not granted yet ("
        + ", ".join(missing)
        + f"). Ask the portal's admin to open {reauth_url(settings)} and approve again.",
        session=session,
    )
    await park_portal_events(portal_id, session=session)


async def check_scopes(services: Services) -> int:
    """Mark every active portal that lacks a required scope `needs_reauth`; returns how many."""
    required = set(services.settings.required_scopes)
    async with services.sessions() as session:
        portals = (
            await session.execute(
                sa.select(col(Portal.portal_id), col(Portal.scopes)).where(
                    col(Portal.status) == PortalStatus.active
                )
            )
        ).all()
    marked = 0
    for portal_id, scopes in portals:
        missing = sorted(required - set(scopes.split()))
        if missing:
            async with transaction(services.sessions) as session:
                await mark_needs_reauth(
                    portal_id, missing, session=session, settings=services.settings
                )
            marked += 1
    return marked


# --- uninstall ----------------------------------------------------------------------


async def signal_uninstall(
    portal_id: int,
    *,
    reason: UninstallReason,
    install_generation: int | None,
    occurred_at: datetime | None,
    session: AsyncSession,
    cipher: TokenCipher,
    key: str | None = None,
) -> int:
    """Put an uninstall signal into the inbox; returns the event id."""
    source = EventSource.journal if reason == UninstallReason.journal else EventSource.lifecycle
    when = occurred_at or utcnow()
    enqueued = await enqueue(
        NewEvent(
            portal_id=portal_id,
            source=source,
            type=UNINSTALL_EVENT,
            idempotency_key=key or f"{reason}:{install_generation}",
            occurred_at=when,
            payload={
                "reason": str(reason),
                "install_generation": install_generation,
                "occurred_at": occurred_at.isoformat() if occurred_at else None,
            },
        ),
        session=session,
        cipher=cipher,
    )
    return enqueued.event_id


async def apply_uninstall(
    portal_id: int,
    *,
    install_generation: int | None,
    occurred_at: datetime | None,
    session: AsyncSession,
) -> str:
    """Uninstall the portal unless the signal predates its current install; says what happened."""
    portal = await _portal_for_update(portal_id, session=session)
    if portal is None:
        return "unknown_portal"
    if install_generation is not None and install_generation < portal.install_generation:
        return "stale"
    if install_generation is None and occurred_at is not None and occurred_at < portal.installed_at:
        return "stale"
    await delete_tokens(portal_id, session=session)
    parked = await park_portal_events(portal_id, session=session)
    if portal.status == PortalStatus.uninstalled:
        return "already_uninstalled"
    now = utcnow()
    portal.status = PortalStatus.uninstalled
    portal.uninstalled_at = now
    portal.updated_at = now
    # What was wrong with the installation goes with it; a reinstall checks again.
    await session.execute(sa.delete(PortalProblem).where(col(PortalProblem.portal_id) == portal_id))
    await session.flush()
    log.info("portal uninstalled; %d events parked", parked, extra={"portal_id": portal_id})
    return "uninstalled"


@registry.handler(UNINSTALL_EVENT)
async def handle_uninstall(ctx: HandlerContext, events: list[EventView]) -> dict[int, Outcome]:
    """The one uninstall handler every signal reaches."""
    outcomes: dict[int, Outcome] = {}
    for event in events:
        generation = event.payload.get("install_generation")
        occurred = moment(event.payload.get("occurred_at"))
        async with transaction(ctx.services.sessions) as session:
            outcome = await apply_uninstall(
                event.portal_id,
                install_generation=int(generation) if generation is not None else None,
                occurred_at=occurred,
                session=session,
            )
        outcomes[event.id] = Done(
            result={"outcome": outcome, "reason": event.payload.get("reason")}
        )
    return outcomes


# --- disconnect ---------------------------------------------------------------------


@dataclass(frozen=True)
class Disconnected:
    event_id: int | None  # the uninstall queued; None when the portal was uninstalled before
    uninstalled_on_hubspot: bool
    revoked: bool
    # The portal was uninstalled before: nothing was asked of HubSpot, nothing queued.
    already_uninstalled: bool = False


# HubSpot may answer these later: the uninstall is worth asking again. A refusal of
# Hubline's own client credentials too: it says nothing of the portal, and ends when an
# operator mends the settings.
_PASSING_FAILURES = (HubSpotUnavailable, HubSpotRateLimited, ClientRefused)


async def disconnect(services: Services, portal_id: int, *, force: bool = False) -> Disconnected:
    """Uninstall the app from the portal on HubSpot, revoke its token, and signal the uninstall.

    When HubSpot is down or limiting (5xx, no answer, 429), or refuses Hubline's own client
    credentials, nothing changes and HubSpotNotReached says to try again, unless `force`:
    then the portal is disconnected here alone. Any other refusal (a token HubSpot no
    longer takes, the app not installed there) means there is nothing left to uninstall on
    HubSpot's side, and it goes ahead.
    """
    async with services.sessions() as session:
        portal = await session.get(Portal, portal_id)
        if portal is None:
            raise LookupError(f"no portal {portal_id}")
        generation = portal.install_generation
        if portal.status == PortalStatus.uninstalled:
            return Disconnected(
                None, uninstalled_on_hubspot=False, revoked=False, already_uninstalled=True
            )
    uninstalled = revoked = False
    try:
        await HubSpotClient(services, portal_id, allow_needs_reauth=True).delete(APP_UNINSTALL_PATH)
        uninstalled = True
    except _PASSING_FAILURES as error:
        if not force:
            raise HubSpotNotReached(
                f"HubSpot could not be reached to uninstall the app ({error.message}): "
                f"portal {portal_id} is still connected; try again"
            ) from None
        log.warning(
            "HubSpot's app-uninstall call failed; disconnecting anyway: %s",
            error,
            extra={"portal_id": portal_id},
        )
    except (HubSpotError, PortalUnavailable) as error:
        log.warning(
            "HubSpot's app-uninstall call failed: %s", error, extra={"portal_id": portal_id}
        )
    async with services.sessions() as session:
        tokens = await load_tokens(portal_id, session=session, cipher=services.cipher)
    if tokens is not None:
        try:
            await HubSpotOAuth(services.settings, services.http).revoke(tokens.refresh_token)
            revoked = True
        except HubSpotError as error:
            log.warning(
                "revoking the refresh token failed: %s", error, extra={"portal_id": portal_id}
            )
    async with transaction(services.sessions) as session:
        event_id = await signal_uninstall(
            portal_id,
            reason=UninstallReason.disconnect,
            install_generation=generation,
            occurred_at=utcnow(),
            session=session,
            cipher=services.cipher,
        )
        # Applied at once, not when the worker reaches the signal behind the portal's
        # earlier events: until then it would sync them with the tokens just revoked.
        await apply_uninstall(
            portal_id, install_generation=generation, occurred_at=None, session=session
        )
    return Disconnected(event_id, uninstalled_on_hubspot=uninstalled, revoked=revoked)


# --- the webhooks journal -------------------------------------------------------------


async def app_token(services: Services) -> Secret:
    """The app-level token for the journal, fetched again shortly before it expires."""
    runtime = services.hubspot
    async with runtime.app_token_lock:
        cached = runtime.app_token
        if cached is not None and cached.expires_at - runtime.clock() > 60:
            return cached.access_token
        answer = await HubSpotOAuth(services.settings, services.http).client_credentials(
            JOURNAL_SCOPE
        )
        runtime.app_token = AppToken(answer.access_token, runtime.clock() + answer.expires_in)
        return answer.access_token


async def poll_journal(services: Services) -> int:
    """Read new webhooks-journal entries, turning uninstalls into inbox events; returns how many.

    The offset is stored with each entry's event, so a poll that stops anywhere
    resumes after the last entry it recorded. Errors propagate to the periodic runner,
    which logs them and tries again next time. With no portal installed there is nothing
    an entry could change, and HubSpot is not asked.
    """
    if not await _any_portal_installed(services):
        return 0
    offset = await _journal_offset(services)
    read = 0
    for _ in range(JOURNAL_MAX_BATCHES):
        if offset:
            path = f"{JOURNAL_PATH}/batch/{offset}/next/{JOURNAL_BATCH}"
        else:
            path = f"{JOURNAL_PATH}/batch/earliest/{JOURNAL_BATCH}"
        response = await _journal_get(services, path)
        if response.status_code == 404 and offset:
            # The offset is older than HubSpot's retention: start again from the
            # earliest entry; idempotency keys make entries seen before no-ops.
            log.warning("the journal offset expired; reading from the earliest entry")
            await _forget_journal_offset(services, offset)
            offset = None
            continue
        if response.status_code == 204:
            break
        if not response.is_success:
            raise error_from_response(response, portal_id=None, what="journal read")
        results = response.json().get("results") or []
        for item in results:
            entry = await _download_entry(services, str(item["url"]))
            offset = str(item["currentOffset"])
            async with transaction(services.sessions) as session:
                await _record_entry(services, entry, offset, session=session)
            read += 1
        if len(results) < JOURNAL_BATCH:
            break
    return read


async def _journal_get(services: Services, path: str) -> httpx.Response:
    url = services.settings.hubspot_api_url + path
    token = await app_token(services)
    response = await services.http.get(url, headers={"Authorization": f"Bearer {token.reveal()}"})
    count_hubspot_request(path, response.status_code)
    if response.status_code == 401:
        services.hubspot.app_token = None  # expired early or revoked: fetch a new one once
        token = await app_token(services)
        response = await services.http.get(
            url, headers={"Authorization": f"Bearer {token.reveal()}"}
        )
        count_hubspot_request(path, response.status_code)
    return response


async def _download_entry(services: Services, url: str) -> dict[str, Any]:
    # The short-lived URL is itself the credential: no Authorization header, and never logged.
    response = await services.http.get(url)
    if not response.is_success:
        raise error_from_response(response, portal_id=None, what="journal entry download")
    body = response.json()
    return body if isinstance(body, dict) else {}


async def _record_entry(
    services: Services, entry: dict[str, Any], offset: str, *, session: AsyncSession
) -> None:
    for position, event in enumerate(_journal_events(entry)):
        portal_id = _first_int(event, "portalId", "portal_id", "hubId", "installPortalId")
        if portal_id is None or not _is_uninstall(event):
            continue
        occurred = moment(event.get("occurredAt") or event.get("occurred_at"))
        known = await session.get(Portal, portal_id)
        if known is not None and occurred is None:
            # Without a time it cannot be told from a signal predating a reinstall;
            # a real uninstall still surfaces at the next refresh (invalid_grant).
            log.warning(
                "journal uninstall entry without a time ignored", extra={"portal_id": portal_id}
            )
        elif known is not None:
            await signal_uninstall(
                portal_id,
                reason=UninstallReason.journal,
                install_generation=None,
                occurred_at=occurred,
                session=session,
                cipher=services.cipher,
                key=f"journal:{offset}" + (f":{position}" if position else ""),
            )
    await _save_journal_offset(offset, session=session)


# Lists a downloaded entry may hold its events in, instead of being one event itself.
_EVENT_LISTS = ("journalEvents", "events", "results")


def _journal_events(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a downloaded journal entry."""
    # HubSpot does not document the entry's shape: it may be the event itself, or hold a
    # list of them (integrations have met `{"journalEvents": [...]}`). Both are read.
    for name in _EVENT_LISTS:
        listed = entry.get(name)
        if isinstance(listed, list):
            return [event for event in listed if isinstance(event, dict)]
    return [entry]


def _is_uninstall(entry: dict[str, Any]) -> bool:
    action = str(entry.get("action") or entry.get("changeType") or "").upper()
    return action in UNINSTALL_ACTIONS or str(entry.get("eventTypeId")) == UNINSTALL_EVENT_TYPE_ID


def _first_int(entry: dict[str, Any], *names: str) -> int | None:
    for name in names:
        try:
            return int(entry[name])
        except (KeyError, TypeError, ValueError):
            continue
    return None


async def _any_portal_installed(services: Services) -> bool:
    async with services.sessions() as session:
        installed = sa.exists().where(col(Portal.status) != PortalStatus.uninstalled)
        return bool(await session.scalar(sa.select(installed)))


async def _journal_offset(services: Services) -> str | None:
    async with services.sessions() as session:
        row = await session.get(AppState, JOURNAL_OFFSET_KEY)
    if row is None:
        return None
    return row.value or None  # "" once found expired


async def _save_journal_offset(offset: str, *, session: AsyncSession) -> None:
    row = await session.get(AppState, JOURNAL_OFFSET_KEY)
    if row is None:
        session.add(AppState(name=JOURNAL_OFFSET_KEY, value=offset))
    else:
        row.value = offset
        row.updated_at = utcnow()
    await session.flush()


async def _forget_journal_offset(services: Services, expired: str) -> None:
    """Blank an offset HubSpot no longer keeps, so later polls start from the earliest entry."""
    # Otherwise, with nothing newer to record (an empty read records no entry), every poll
    # would ask for it again. Blanked, not deleted: the row stays for the next save.
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(AppState)
            .where(col(AppState.name) == JOURNAL_OFFSET_KEY, col(AppState.value) == expired)
            .values(value="", updated_at=utcnow())
        )


def add_periodic_jobs(worker: Worker, settings: Settings) -> None:
    """Register the journal poller (unless JOURNAL_POLL_SECONDS is 0) and the scope check."""
    if settings.journal_poll_seconds > 0:

        async def journal(services: Services) -> None:
            await poll_journal(services)

        worker.add_periodic("journal", float(settings.journal_poll_seconds), journal)

    async def scope_check(services: Services) -> None:
        await check_scopes(services)

    worker.add_periodic("scope-check", 3600.0, scope_check)


# --- what the operator sees -------------------------------------------------------------


async def portal_summaries(
    *, session: AsyncSession, settings: Settings, portal_id: int | None = None
) -> list[dict[str, Any]]:
    """Portals as the admin API and the CLI show them (no secrets)."""
    query = sa.select(Portal).order_by(col(Portal.portal_id))
    if portal_id is not None:
        query = query.where(col(Portal.portal_id) == portal_id)
    portals = list((await session.execute(query)).scalars())
    problems: dict[int, list[dict[str, Any]]] = {}
    if portals:
        rows = await session.execute(
            sa.select(PortalProblem)
            .where(col(PortalProblem.portal_id).in_([p.portal_id for p in portals]))
            .order_by(col(PortalProblem.updated_at).desc())
        )
        for problem in rows.scalars():
            problems.setdefault(problem.portal_id, []).append(
                {
                    "code": problem.code,
                    "message": problem.message,
                    "updated_at": problem.updated_at.isoformat(),
                }
            )
    return [
        {
            "portal_id": portal.portal_id,
            "status": portal.status,
            "hub_domain": portal.hub_domain,
            "install_generation": portal.install_generation,
            "scopes": sorted(portal.scope_set),
            "installed_at": portal.installed_at.isoformat(),
            "uninstalled_at": portal.uninstalled_at.isoformat() if portal.uninstalled_at else None,
            "webhook_url": webhook_url(settings, portal.portal_id),
            "reauth_url": (
                reauth_url(settings) if portal.status == PortalStatus.needs_reauth else None
            ),
            "problems": problems.get(portal.portal_id, []),
        }
        for portal in portals
    ]
