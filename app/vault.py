"""Where each encrypted field's associated data is defined, and key rotation over all of them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import TokenCipher, field_context
from app.db import SessionFactory, rowcount
from app.models import EventSource, InboxEvent, OAuthState, OAuthToken, ReceptionistSecret, utcnow


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
    columns = (col(OAuthToken.key_id), col(ReceptionistSecret.key_id), col(OAuthState.key_id))
    for column in columns:
        query = sa.select(sa.func.count()).where(
            column.is_not(None), column != cipher.primary_key_id
        )
        total += (await session.execute(query)).scalar_one()
    events = sa.select(sa.func.count()).where(
        sa.or_(
            sa.and_(
                col(InboxEvent.key_id).is_not(None),
                col(InboxEvent.key_id) != cipher.primary_key_id,
            ),
            sa.not_(col(InboxEvent.idempotency_hash).startswith(f"{cipher.primary_key_id}:")),
        )
    )
    total += (await session.execute(events)).scalar_one()
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
    primary = cipher.primary_key_id
    rows = (
        await session.execute(
            sa.select(
                col(InboxEvent.id),
                col(InboxEvent.portal_id),
                col(InboxEvent.source),
                col(InboxEvent.idempotency_hash),
                col(InboxEvent.payload_ct),
            )
            .where(
                sa.or_(
                    sa.and_(col(InboxEvent.key_id).is_not(None), col(InboxEvent.key_id) != primary),
                    # The idempotency hash is keyed too: once the old key is removed, a
                    # hash made with it no longer matches a redelivery of the same event.
                    sa.not_(col(InboxEvent.idempotency_hash).startswith(f"{primary}:")),
                )
            )
            .limit(limit)
        )
    ).all()
    changed = 0
    for event_id, portal_id, source, old_hash, payload_ct in rows:
        plain = None
        if payload_ct is not None:
            plain = cipher.decrypt(payload_ct, context=payload_context(portal_id, old_hash))
        new_hash = _rekeyed_idempotency_hash(cipher, event_id, portal_id, source, old_hash, plain)
        values: dict[str, object] = {"idempotency_hash": new_hash}
        if plain is None:
            # Purged payload with a stale key id: nothing to re-encrypt.
            values |= {"payload_ct": None, "key_id": None}
        else:
            values |= {
                "payload_ct": cipher.encrypt(plain, context=payload_context(portal_id, new_hash)),
                "key_id": primary,
            }
        result = await session.execute(
            sa.update(InboxEvent)
            .where(
                col(InboxEvent.id) == event_id,
                col(InboxEvent.idempotency_hash) == old_hash,
                col(InboxEvent.payload_ct) == payload_ct,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        changed += rowcount(result)
    return len(rows), changed


def _rekeyed_idempotency_hash(
    cipher: TokenCipher,
    event_id: int | None,
    portal_id: int,
    source: str,
    old_hash: str,
    payload: bytes | None,
) -> str:
    """The event's idempotency hash under the primary key."""
    # Receptionist and HubSpot events (the ones senders redeliver) carry their key in the
    # payload; it is checked against the old hash before use. Any other event gets a
    # unique hash under the new key: only its deduplication is given up, never its data.
    if old_hash.startswith(f"{cipher.primary_key_id}:"):
        return old_hash
    from app.inbox import NewEvent, idempotency_hashes  # the inbox builds on this module

    key = _idempotency_key(source, json.loads(payload)) if payload is not None else None
    if key is not None:
        hashes = idempotency_hashes(
            cipher, NewEvent(portal_id, EventSource(source), "", key, utcnow())
        )
        if old_hash in hashes:
            return hashes[0]
    return cipher.blind_index("event-rekeyed", f"{source}\x00{event_id}", portal_id)


def _idempotency_key(source: str, payload: object) -> str | None:
    """The key an event was stored under, where its payload tells it."""
    if not isinstance(payload, dict):
        return None
    if source == EventSource.receptionist:
        value = payload.get("id")
        return value if isinstance(value, str) and value else None
    if source == EventSource.hubspot:
        from app.webhooks import HubSpotEvent, parse_hubspot_event

        parsed = parse_hubspot_event(payload, 0)
        return parsed.idempotency_key if isinstance(parsed, HubSpotEvent) else None
    return None


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
