"""Where each encrypted field's associated data is defined, and key rotation over all of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import TokenCipher, field_context
from app.db import SessionFactory, rowcount
from app.models import InboxEvent, OAuthState, OAuthToken, ReceptionistSecret


def access_token_context(portal_id: int) -> str:
    return field_context("oauth_tokens", "access_token", portal_id)


def refresh_token_context(portal_id: int) -> str:
    return field_context("oauth_tokens", "refresh_token", portal_id)


def receptionist_secret_context(portal_id: int) -> str:
    return field_context("receptionist_secrets", "secret", portal_id)


def payload_context(portal_id: int, idempotency_hash: str) -> str:
    return field_context("events", "payload", portal_id, idempotency_hash)


def code_verifier_context(state_hash: str) -> str:
    return field_context("oauth_states", "code_verifier", 0, state_hash)


@dataclass
class RotationReport:
    """How many rows `rotate_keys` re-encrypted, per table."""

    changed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.changed.values())


Progress = Callable[[str, int], None]


async def count_rows_to_rotate(*, session: AsyncSession, cipher: TokenCipher) -> int:
    total = 0
    columns = (
        col(OAuthToken.key_id),
        col(ReceptionistSecret.key_id),
        col(InboxEvent.key_id),
        col(OAuthState.key_id),
    )
    for column in columns:
        query = sa.select(sa.func.count()).where(
            column.is_not(None), column != cipher.primary_key_id
        )
        total += (await session.execute(query)).scalar_one()
    return total


async def rotate_keys(
    sessions: SessionFactory,
    cipher: TokenCipher,
    *,
    batch_size: int = 100,
    progress: Progress | None = None,
) -> RotationReport:
    """Re-encrypt every stored secret under the primary key, one small transaction per batch.

    Each row is rewritten with a compare-and-swap on its old ciphertext, so a token
    refreshed concurrently (already under the primary key) is never overwritten
    with a stale value, and a rotation killed at any point resumes where it stopped.
    """
    report = RotationReport()
    steps: list[tuple[str, Callable[[AsyncSession], Awaitable[tuple[int, int]]]]] = [
        ("oauth_tokens", lambda s: _rotate_tokens(s, cipher, batch_size)),
        ("receptionist_secrets", lambda s: _rotate_secrets(s, cipher, batch_size)),
        ("events", lambda s: _rotate_payloads(s, cipher, batch_size)),
        ("oauth_states", lambda s: _rotate_states(s, cipher, batch_size)),
    ]
    for table, step in steps:
        report.changed[table] = 0
        fruitless = 0
        while True:
            async with sessions() as session, session.begin():
                seen, changed = await step(session)
            report.changed[table] += changed
            if progress is not None and changed:
                progress(table, changed)
            if seen == 0:
                break
            fruitless = fruitless + 1 if changed == 0 else 0
            if fruitless >= 3:
                # Only a process whose first key is not ours rewrites rows under an old key.
                raise RuntimeError(
                    f"rows in {table} keep being written under an old key: give every "
                    "process the same TOKEN_ENCRYPTION_KEYS (new key first), then rotate again"
                )
    return report


async def _rotate_tokens(session: AsyncSession, cipher: TokenCipher, limit: int) -> tuple[int, int]:
    rows = (
        (
            await session.execute(
                sa.select(OAuthToken)
                .where(col(OAuthToken.key_id) != cipher.primary_key_id)
                .limit(limit)
            )
        )
        .scalars()
        .all()
    )
    changed = 0
    for token in rows:
        access = cipher.encrypt(
            cipher.decrypt(token.access_token_ct, context=access_token_context(token.portal_id)),
            context=access_token_context(token.portal_id),
        )
        refresh = cipher.encrypt(
            cipher.decrypt(token.refresh_token_ct, context=refresh_token_context(token.portal_id)),
            context=refresh_token_context(token.portal_id),
        )
        result = await session.execute(
            sa.update(OAuthToken)
            .where(
                col(OAuthToken.portal_id) == token.portal_id,
                col(OAuthToken.version) == token.version,
            )
            .values(
                access_token_ct=access,
                refresh_token_ct=refresh,
                key_id=cipher.primary_key_id,
                version=token.version + 1,
            )
            .execution_options(synchronize_session=False)
        )
        changed += rowcount(result)
    return len(rows), changed


async def _rotate_secrets(
    session: AsyncSession, cipher: TokenCipher, limit: int
) -> tuple[int, int]:
    rows = (
        (
            await session.execute(
                sa.select(ReceptionistSecret)
                .where(col(ReceptionistSecret.key_id) != cipher.primary_key_id)
                .limit(limit)
            )
        )
        .scalars()
        .all()
    )
    changed = 0
    for secret in rows:
        context = receptionist_secret_context(secret.portal_id)
        new = cipher.encrypt(cipher.decrypt(secret.secret_ct, context=context), context=context)
        result = await session.execute(
            sa.update(ReceptionistSecret)
            .where(
                col(ReceptionistSecret.id) == secret.id,
                col(ReceptionistSecret.secret_ct) == secret.secret_ct,
            )
            .values(secret_ct=new, key_id=cipher.primary_key_id)
            .execution_options(synchronize_session=False)
        )
        changed += rowcount(result)
    return len(rows), changed


async def _rotate_payloads(
    session: AsyncSession, cipher: TokenCipher, limit: int
) -> tuple[int, int]:
    rows = (
        await session.execute(
            sa.select(
                col(InboxEvent.id),
                col(InboxEvent.portal_id),
                col(InboxEvent.idempotency_hash),
                col(InboxEvent.payload_ct),
            )
            .where(
                col(InboxEvent.key_id).is_not(None),
                col(InboxEvent.key_id) != cipher.primary_key_id,
            )
            .limit(limit)
        )
    ).all()
    changed = 0
    for event_id, portal_id, idempotency_hash, payload_ct in rows:
        if payload_ct is None:
            # Purged payload with a stale key id: nothing to re-encrypt.
            values: dict[str, object] = {"key_id": None}
        else:
            context = payload_context(portal_id, idempotency_hash)
            values = {
                "payload_ct": cipher.encrypt(
                    cipher.decrypt(payload_ct, context=context), context=context
                ),
                "key_id": cipher.primary_key_id,
            }
        result = await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id) == event_id, col(InboxEvent.payload_ct) == payload_ct)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        changed += rowcount(result)
    return len(rows), changed


async def _rotate_states(session: AsyncSession, cipher: TokenCipher, limit: int) -> tuple[int, int]:
    rows = (
        (
            await session.execute(
                sa.select(OAuthState)
                .where(
                    col(OAuthState.key_id).is_not(None),
                    col(OAuthState.key_id) != cipher.primary_key_id,
                )
                .limit(limit)
            )
        )
        .scalars()
        .all()
    )
    changed = 0
    for state in rows:
        values: dict[str, object]
        if state.code_verifier_ct is None:
            values = {"key_id": None}
        else:
            context = code_verifier_context(state.state_hash)
            plain = cipher.decrypt(state.code_verifier_ct, context=context)
            values = {
                "code_verifier_ct": cipher.encrypt(plain, context=context),
                "key_id": cipher.primary_key_id,
            }
        result = await session.execute(
            sa.update(OAuthState)
            .where(col(OAuthState.state_hash) == state.state_hash)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        changed += rowcount(result)
    return len(rows), changed
