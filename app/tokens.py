"""The token vault: a portal's OAuth tokens, stored only as ciphertexts.

`version` makes every write a compare-and-swap, so two processes refreshing the
same portal can never interleave an old refresh token over a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import Secret, TokenCipher
from app.db import rowcount
from app.models import OAuthToken, utcnow
from app.vault import access_token_context, refresh_token_context


@dataclass(frozen=True)
class TokenSet:
    """A portal's tokens in memory; the `Secret`s keep them out of reprs and logs."""

    portal_id: int
    access_token: Secret
    refresh_token: Secret
    expires_at: datetime
    version: int
    install_generation: int

    def expires_within(self, seconds: float, *, now: datetime | None = None) -> bool:
        return self.expires_at - (now or utcnow()) <= timedelta(seconds=seconds)


async def load_tokens(
    portal_id: int, *, session: AsyncSession, cipher: TokenCipher, for_update: bool = False
) -> TokenSet | None:
    """The portal's tokens; `for_update` takes the row lock (PostgreSQL) for a refresh."""
    query = sa.select(OAuthToken).where(col(OAuthToken.portal_id) == portal_id)
    if for_update:
        # SQLite has no row locks; its single writer serializes refreshes instead.
        query = query.with_for_update()
    row = (
        await session.execute(query.execution_options(populate_existing=True))
    ).scalar_one_or_none()
    if row is None:
        return None
    return TokenSet(
        portal_id=portal_id,
        access_token=Secret(
            cipher.decrypt_str(row.access_token_ct, context=access_token_context(portal_id))
        ),
        refresh_token=Secret(
            cipher.decrypt_str(row.refresh_token_ct, context=refresh_token_context(portal_id))
        ),
        expires_at=row.expires_at,
        version=row.version,
        install_generation=row.install_generation,
    )


async def store_tokens(
    portal_id: int,
    *,
    access_token: str,
    refresh_token: str,
    expires_in: float,
    install_generation: int,
    session: AsyncSession,
    cipher: TokenCipher,
    expected_version: int | None = None,
) -> int | None:
    """Write the portal's tokens; returns the new version, or None when the CAS lost.

    With `expected_version` None the tokens are replaced whatever was there (an
    install); otherwise only if the stored version still matches (a refresh).
    """
    values: dict[str, Any] = {
        "access_token_ct": cipher.encrypt(access_token, context=access_token_context(portal_id)),
        "refresh_token_ct": cipher.encrypt(refresh_token, context=refresh_token_context(portal_id)),
        "key_id": cipher.primary_key_id,
        "expires_at": utcnow() + timedelta(seconds=expires_in),
        "install_generation": install_generation,
        "updated_at": utcnow(),
    }
    existing = (
        await session.execute(
            sa.select(col(OAuthToken.version)).where(col(OAuthToken.portal_id) == portal_id)
        )
    ).scalar_one_or_none()
    if existing is None:
        if expected_version is not None:
            return None
        session.add(OAuthToken(portal_id=portal_id, version=1, **values))
        await session.flush()
        return 1
    if expected_version is not None and existing != expected_version:
        return None
    new_version = existing + 1
    result = await session.execute(
        sa.update(OAuthToken)
        .where(col(OAuthToken.portal_id) == portal_id, col(OAuthToken.version) == existing)
        .values(version=new_version, **values)
        .execution_options(synchronize_session=False)
    )
    return new_version if rowcount(result) == 1 else None


async def delete_tokens(portal_id: int, *, session: AsyncSession) -> bool:
    result = await session.execute(
        sa.delete(OAuthToken)
        .where(col(OAuthToken.portal_id) == portal_id)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) > 0
