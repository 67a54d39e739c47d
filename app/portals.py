"""The portals data layer: portals, their problems and their receptionist secrets.

Functions take `*, session` and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
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
    readable = []
    for row in rows:
        try:
            readable.append(Secret(cipher.decrypt_str(row.secret_ct, context=context)))
        except CryptoError as error:
            # Tampered with or copied from another portal's row: it authenticates nothing,
            # so the request is refused (401) rather than failing with a 500.
            log.error("receptionist secret unreadable: %s", error, extra={"portal_id": portal_id})
    return readable


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


async def list_problems(portal_id: int, *, session: AsyncSession) -> list[PortalProblem]:
    rows = await session.execute(
        sa.select(PortalProblem)
        .where(col(PortalProblem.portal_id) == portal_id)
        .order_by(col(PortalProblem.updated_at).desc())
    )
    return list(rows.scalars().all())
