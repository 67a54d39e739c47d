"""The portals data layer: portals, their problems and their receptionist secrets.

Functions take `*, session` and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from app.crypto import Secret, TokenCipher, new_webhook_secret
from app.errors import CryptoError
from app.models import Portal, PortalProblem, ReceptionistSecret, utcnow
from app.vault import receptionist_secret_context

log = logging.getLogger(__name__)


async def get_portal(portal_id: int, *, session: AsyncSession) -> Portal | None:
    return await session.get(Portal, portal_id)


async def create_secret(portal_id: int, *, session: AsyncSession, cipher: TokenCipher) -> Secret:
    """A new current receptionist secret for the portal."""
    plain = new_webhook_secret()
    session.add(
        ReceptionistSecret(
            portal_id=portal_id,
            secret_ct=cipher.encrypt(plain, context=receptionist_secret_context(portal_id)),
            key_id=cipher.primary_key_id,
        )
    )
    await session.flush()
    return Secret(plain)


async def rotate_secret(
    portal_id: int, *, session: AsyncSession, cipher: TokenCipher, grace: timedelta
) -> Secret:
    """Replace the current secret; the old one keeps working for `grace` (Standard Webhooks)."""
    # A secret rotated with no grace stops working at once in this process; other
    # processes read it again within PORTAL_CACHE_SECONDS.
    forget_everywhere(portal_id)
    now = utcnow()
    await session.execute(
        sa.update(ReceptionistSecret)
        .where(
            col(ReceptionistSecret.portal_id) == portal_id,
            col(ReceptionistSecret.expires_at).is_(None),
        )
        .values(expires_at=now + grace)
        .execution_options(synchronize_session=False)
    )
    return await create_secret(portal_id, session=session, cipher=cipher)


async def current_secret(
    portal_id: int, *, session: AsyncSession, cipher: TokenCipher
) -> Secret | None:
    """The secret to show the portal's admin (the newest one that does not expire)."""
    row = (
        await session.execute(
            sa.select(ReceptionistSecret)
            .where(
                col(ReceptionistSecret.portal_id) == portal_id,
                col(ReceptionistSecret.expires_at).is_(None),
            )
            .order_by(col(ReceptionistSecret.id).desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    return Secret(cipher.decrypt_str(row.secret_ct, context=receptionist_secret_context(portal_id)))


async def accepted_secrets(
    portal_id: int, *, session: AsyncSession, cipher: TokenCipher
) -> list[Secret]:
    """Every secret an event may be signed with now: the current one and any in grace."""
    return [secret for secret, _expires in await _accepted(portal_id, session, cipher)]


async def _accepted(
    portal_id: int, session: AsyncSession, cipher: TokenCipher
) -> list[tuple[Secret, datetime | None]]:
    now = utcnow()
    rows = (
        (
            await session.execute(
                sa.select(ReceptionistSecret)
                .where(
                    col(ReceptionistSecret.portal_id) == portal_id,
                    sa.or_(
                        col(ReceptionistSecret.expires_at).is_(None),
                        col(ReceptionistSecret.expires_at) > now,
                    ),
                )
                .order_by(col(ReceptionistSecret.id).desc())
            )
        )
        .scalars()
        .all()
    )
    context = receptionist_secret_context(portal_id)
    readable: list[tuple[Secret, datetime | None]] = []
    for row in rows:
        try:
            secret = Secret(cipher.decrypt_str(row.secret_ct, context=context))
        except CryptoError as error:
            # Tampered with or copied from another portal's row: it authenticates nothing,
            # so the request is refused (401) rather than failing with a 500.
            log.error("receptionist secret unreadable: %s", error, extra={"portal_id": portal_id})
            continue
        readable.append((secret, row.expires_at))
    return readable


# How long a portal's status and secrets are trusted without reading them again. A rotated
# secret works at once all the same (a failed check reloads before refusing); a status
# change (uninstall, needs re-authorization) reaches intake within this time, and the
# worker parks what it cannot serve meanwhile.
PORTAL_CACHE_SECONDS = 5.0

Sessions = async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class KnownPortal:
    """What the receptionist webhook needs of a portal: its state and accepted secrets."""

    portal_id: int
    status: str
    default_phone_region: str | None
    secrets: tuple[Secret, ...]


@dataclass(frozen=True)
class _Entry:
    portal: KnownPortal
    fresh_until: float


class PortalCache:
    """Each portal's status, phone region and decrypted receptionist secrets, kept in memory
    for at most `ttl` seconds (never past a secret's expiry); unknown portals are not kept."""

    def __init__(
        self,
        sessions: Sessions,
        cipher: TokenCipher,
        *,
        ttl: float = PORTAL_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._cipher = cipher
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[int, _Entry] = {}
        self._loading: dict[int, asyncio.Future[KnownPortal | None]] = {}
        _caches.add(self)

    async def get(self, portal_id: int) -> tuple[KnownPortal | None, bool]:
        """The portal (None: unknown) and whether it came from memory rather than the database."""
        entry = self._entries.get(portal_id)
        if entry is not None and self._clock() < entry.fresh_until:
            return entry.portal, True
        # Concurrent requests for a portal whose entry lapsed share one read.
        loading = self._loading.get(portal_id)
        if loading is None:
            loading = asyncio.ensure_future(self.reload(portal_id))
            self._loading[portal_id] = loading
            loading.add_done_callback(lambda done: self._loaded(portal_id, done))
        return await asyncio.shield(loading), False

    def _loaded(self, portal_id: int, done: asyncio.Future[KnownPortal | None]) -> None:
        if self._loading.get(portal_id) is done:
            del self._loading[portal_id]
        if not done.cancelled():
            done.exception()  # every waiter sees it; retrieved here should all have gone

    async def reload(self, portal_id: int) -> KnownPortal | None:
        """The portal as the database has it now (remembered for the next requests)."""
        self._entries.pop(portal_id, None)
        started = self._clock()
        async with self._sessions() as session:
            portal = await get_portal(portal_id, session=session)
            if portal is None:
                return None
            accepted = await _accepted(portal_id, session, self._cipher)
        known = KnownPortal(
            portal_id=portal_id,
            status=portal.status,
            default_phone_region=portal.default_phone_region,
            secrets=tuple(secret for secret, _expires in accepted),
        )
        fresh_until = started + self._ttl
        now = utcnow()
        for _secret, expires_at in accepted:
            if expires_at is not None:
                # A secret in grace stops working at its expiry, not up to `ttl` later.
                fresh_until = min(fresh_until, started + (expires_at - now).total_seconds())
        self._entries[portal_id] = _Entry(known, fresh_until)
        return known

    def forget(self, portal_id: int) -> None:
        self._entries.pop(portal_id, None)


_caches: weakref.WeakSet[PortalCache] = weakref.WeakSet()


def forget_everywhere(portal_id: int) -> None:
    """Drop the portal from every cache in this process (its secrets or status change)."""
    for cache in list(_caches):
        cache.forget(portal_id)


async def record_problem(portal_id: int, code: str, message: str, *, session: AsyncSession) -> None:
    """Report (or refresh) a problem on the portal; `code` names it (`property:call_outcome`)."""
    now = utcnow()
    existing = (
        await session.execute(
            sa.select(PortalProblem).where(
                col(PortalProblem.portal_id) == portal_id,
                col(PortalProblem.code) == code,
            )
        )
    ).scalar_one_or_none()
    if existing is None:
        session.add(
            PortalProblem(
                portal_id=portal_id, code=code, message=message, created_at=now, updated_at=now
            )
        )
    else:
        existing.message = message
        existing.updated_at = now
    await session.flush()


async def clear_problem(portal_id: int, code: str, *, session: AsyncSession) -> None:
    await session.execute(
        sa.delete(PortalProblem)
        .where(col(PortalProblem.portal_id) == portal_id, col(PortalProblem.code) == code)
        .execution_options(synchronize_session=False)
    )


async def problem_codes(portal_id: int, *, session: AsyncSession) -> set[str]:
    """The codes of the portal's problems (to report something once, not per event)."""
    rows = await session.execute(
        sa.select(col(PortalProblem.code)).where(col(PortalProblem.portal_id) == portal_id)
    )
    return set(rows.scalars())


async def list_problems(portal_id: int, *, session: AsyncSession) -> list[PortalProblem]:
    rows = await session.execute(
        sa.select(PortalProblem)
        .where(col(PortalProblem.portal_id) == portal_id)
        .order_by(col(PortalProblem.updated_at).desc())
    )
    return list(rows.scalars().all())
