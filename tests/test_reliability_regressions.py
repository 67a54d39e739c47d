"""Failures the reliability suite (reliability/, issue 10) uncovered, kept fixed."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from app.crypto import TokenCipher, generate_key
from app.db import SessionFactory, transaction
from app.inbox import NewEvent, enqueue, read_payload
from app.models import EventSource, InboxEvent, Portal, ReceptionistSecret, utcnow
from app.vault import count_rows_to_rotate, rotate_keys
from app.webhooks import HubSpotEvent, parse_hubspot_event
from tests.conftest import TEST_CLIENT_SECRET
from tests.webhook_support import (
    add_portal,
    call_event,
    dumps,
    hubspot_event,
    hubspot_headers,
    receptionist_path,
    standard_headers,
)


async def test_a_secret_copied_from_another_portal_is_refused_not_a_server_error(
    client: Any, services: Any
) -> None:
    # Run 7 swapped two portals' secret ciphertexts in the database: the route answered
    # 500 (an uncaught CryptoError) instead of refusing the request.
    secrets = {
        portal_id: await add_portal(services.sessions, services.cipher, portal_id)
        for portal_id in (1001, 1002)
    }
    async with transaction(services.sessions) as session:
        rows = {
            row.portal_id: row.secret_ct
            for row in (await session.execute(sa.select(ReceptionistSecret))).scalars()
        }
        for portal_id, other in ((1001, 1002), (1002, 1001)):
            await session.execute(
                sa.update(ReceptionistSecret)
                .where(ReceptionistSecret.portal_id == portal_id)  # type: ignore[arg-type]
                .values(secret_ct=rows[other])
            )
    body = dumps(call_event())
    for target in (1001, 1002):
        for secret in secrets.values():
            signed = await client.post(
                receptionist_path(target), content=body, headers=standard_headers(secret, body)
            )
            bearer = await client.post(
                receptionist_path(target),
                content=body,
                headers={"authorization": f"Bearer {secret.reveal()}"},
            )
            assert (signed.status_code, bearer.status_code) == (401, 401)
    async with services.sessions() as session:
        assert (await session.execute(sa.select(InboxEvent))).first() is None


async def test_a_redelivery_after_the_old_key_is_removed_is_still_a_duplicate(
    sessions: SessionFactory,
) -> None:
    # Run 6: rotation re-encrypted payloads but left idempotency hashes keyed by the old
    # key; once it was removed, a redelivered event was stored (and synced) a second time.
    old_key, new_key = generate_key(), generate_key()
    old = TokenCipher.from_setting(old_key)
    both = TokenCipher.from_setting(f"{new_key},{old_key}")
    new_only = TokenCipher.from_setting(new_key)
    raw = hubspot_event(portalId=1001)
    parsed = parse_hubspot_event(raw, 0)
    assert isinstance(parsed, HubSpotEvent)
    events = [
        NewEvent(
            1001, EventSource.receptionist, "call.completed", "evt_9", utcnow(), {"id": "evt_9"}
        ),
        NewEvent(
            1001,
            EventSource.hubspot,
            parsed.subscription_type,
            parsed.idempotency_key,
            utcnow(),
            raw,
        ),
        NewEvent(
            1001, EventSource.internal, "properties.provision", "provision:1", utcnow(), {"n": 1}
        ),
    ]
    async with transaction(sessions) as session:
        session.add(Portal(portal_id=1001))
        await session.flush()
        for event in events:
            await enqueue(event, session=session, cipher=old)
    await rotate_keys(sessions, both, batch_size=2)
    async with sessions() as session:
        assert await count_rows_to_rotate(session=session, cipher=both) == 0
        rows = list((await session.execute(sa.select(InboxEvent))).scalars())
    assert all(row.idempotency_hash.startswith(new_only.primary_key_id + ":") for row in rows)
    assert [read_payload(row, new_only) for row in rows] == [e.payload for e in events]
    async with transaction(sessions) as session:
        again = [await enqueue(e, session=session, cipher=new_only) for e in events[:2]]
    assert [enqueued.created for enqueued in again] == [False, False]


async def test_a_signed_body_nested_too_deep_is_a_400_not_a_server_error(
    client: Any, services: Any
) -> None:
    # Run 8 signed a body of 200,000 nested arrays: json.loads raised RecursionError,
    # which the route did not expect, and answered 500.
    secret = await add_portal(services.sessions, services.cipher, 1001)
    body = b"[" * 200_000 + b"]" * 200_000
    answer = await client.post(
        receptionist_path(1001), content=body, headers=standard_headers(secret, body)
    )
    assert answer.status_code == 400
    url = "http://hubline.test/webhooks/hubspot"
    hubspot = await client.post(
        "/webhooks/hubspot",
        content=body,
        headers=hubspot_headers(TEST_CLIENT_SECRET, url, body),
    )
    assert hubspot.status_code == 400
    async with services.sessions() as session:
        assert (await session.execute(sa.select(InboxEvent))).first() is None
