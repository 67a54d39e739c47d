"""The inbox: enqueue in the caller's transaction, idempotent, encrypted, retained as configured."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from app.crypto import TokenCipher, generate_key
from app.db import SessionFactory, transaction
from app.errors import CryptoError
from app.inbox import (
    Enqueued,
    InboxWriter,
    NewEvent,
    enqueue,
    enqueue_many,
    expired_payloads,
    newest_of_portal,
    purge_expired_parked,
    purge_expired_payloads,
    read_payload,
)
from app.models import EventSource, EventStatus, InboxEvent, utcnow
from tests.conftest import TEST_KEY


def call_event(key: str = "evt_1", portal_id: int = 1001, **payload: object) -> NewEvent:
    return NewEvent(
        portal_id=portal_id,
        source=EventSource.receptionist,
        type="call.completed",
        idempotency_key=key,
        occurred_at=datetime(2026, 3, 2, 14, 30, tzinfo=UTC),
        payload={"summary": "Wants a cleaning", **payload},
    )


async def count_events(sessions: SessionFactory) -> int:
    async with sessions() as session:
        return (
            await session.execute(sa.select(sa.func.count()).select_from(InboxEvent))
        ).scalar_one()


async def test_event_enqueued_in_a_rolled_back_transaction_is_not_stored(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    with pytest.raises(RuntimeError):
        async with transaction(sessions) as session:
            await enqueue(call_event(), session=session, cipher=cipher)
            raise RuntimeError("the caller failed after enqueueing")
    assert await count_events(sessions) == 0


async def test_event_enqueued_twice_is_stored_once(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        first = await enqueue(call_event(), session=session, cipher=cipher)
    async with transaction(sessions) as session:
        again = await enqueue(call_event(summary="changed"), session=session, cipher=cipher)
    assert first.created
    assert not again.created
    assert again.event_id == first.event_id
    assert await count_events(sessions) == 1


async def test_same_key_in_another_portal_or_source_is_another_event(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        a = await enqueue(call_event(portal_id=1001), session=session, cipher=cipher)
        b = await enqueue(call_event(portal_id=1002), session=session, cipher=cipher)
        hubspot = NewEvent(1001, EventSource.hubspot, "contact.creation", "evt_1", utcnow(), {})
        c = await enqueue(hubspot, session=session, cipher=cipher)
    assert [a.created, b.created, c.created] == [True, True, True]
    assert await count_events(sessions) == 3


async def test_twenty_concurrent_enqueues_of_one_event_store_one_row(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async def deliver() -> bool:
        async with transaction(sessions) as session:
            return (await enqueue(call_event(), session=session, cipher=cipher)).created

    created = await asyncio.gather(*(deliver() for _ in range(20)))
    assert created.count(True) == 1
    assert await count_events(sessions) == 1


async def test_payload_is_encrypted_and_bound_to_its_row(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await enqueue(call_event("a", caller_phone="+14155550100"), session=session, cipher=cipher)
        await enqueue(call_event("b"), session=session, cipher=cipher)
    async with sessions() as session:
        rows = list(
            (await session.execute(sa.select(InboxEvent).order_by(col(InboxEvent.id)))).scalars()
        )
    assert b"4155550100" not in rows[0].payload_ct
    assert read_payload(rows[0], cipher)["caller_phone"] == "+14155550100"
    rows[1].payload_ct = rows[0].payload_ct
    with pytest.raises(CryptoError):
        read_payload(rows[1], cipher)


async def test_duplicate_is_recognised_during_key_rotation(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        await enqueue(call_event(), session=session, cipher=cipher)
    rotated = TokenCipher.from_setting(f"{generate_key()},{TEST_KEY}")
    async with transaction(sessions) as session:
        again = await enqueue(call_event(), session=session, cipher=rotated)
    assert not again.created


async def test_retention_deletes_old_payloads_and_old_parked_events(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    async with transaction(sessions) as session:
        ids = [
            (await enqueue(call_event(key), session=session, cipher=cipher)).event_id
            for key in ("old-done", "new-done", "old-parked", "pending", "old-failed", "new-failed")
        ]
    long_ago = utcnow() - timedelta(days=40)
    async with transaction(sessions) as session:
        for event_id, status, when in [
            (ids[0], EventStatus.done, long_ago),
            (ids[1], EventStatus.done, utcnow()),
            (ids[2], EventStatus.parked, long_ago),
            (ids[4], EventStatus.failed, long_ago),
            (ids[5], EventStatus.failed, utcnow()),
        ]:
            await session.execute(
                sa.update(InboxEvent)
                .where(col(InboxEvent.id) == event_id)
                .values(status=status, finished_at=when, received_at=when)
            )
    payloads = await purge_expired_payloads(sessions, retention=timedelta(days=30))
    async with transaction(sessions) as session:
        parked = await purge_expired_parked(session=session, retention=timedelta(days=30))
    assert (payloads, parked) == (2, 1)
    async with sessions() as session:
        rows = {row.id: row for row in (await session.execute(sa.select(InboxEvent))).scalars()}
    assert rows[ids[0]].payload_ct is None
    assert rows[ids[1]].payload_ct is not None
    assert ids[2] not in rows
    assert rows[ids[3]].payload_ct is not None
    # A failed event is handled too: an operator has the retention period to retry it.
    assert rows[ids[4]].payload_ct is None
    assert rows[ids[5]].payload_ct is not None


async def test_retention_purges_in_chunks_read_through_the_expiry_index(
    engine: AsyncEngine, sessions: SessionFactory, cipher: TokenCipher
) -> None:
    """Over millions of events, reading every finished event held SQLite's write lock for
    seconds each run, and intake with it: only expiring payloads are read, a chunk per
    transaction."""
    long_ago = utcnow() - timedelta(days=40)
    async with transaction(sessions) as session:
        ids = [
            (await enqueue(call_event(f"old-{n}"), session=session, cipher=cipher)).event_id
            for n in range(5)
        ]
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id).in_(ids))
            .values(status=EventStatus.done, finished_at=long_ago)
        )
    assert await purge_expired_payloads(sessions, retention=timedelta(days=30), chunk=2) == 5
    async with sessions() as session:
        left = await session.execute(
            sa.select(col(InboxEvent.id)).where(col(InboxEvent.payload_ct).is_not(None))
        )
        assert list(left.scalars()) == []

    query = expired_payloads(utcnow(), 10)
    async with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            compiled = query.compile(connection, compile_kwargs={"literal_binds": True})
            plan = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
            details = " ".join(str(row[-1]) for row in plan)
        else:
            # A table this small is read whole unless sequential scans are ruled out.
            await connection.execute(sa.text("SET LOCAL enable_seqscan = off"))
            compiled = query.compile(connection, compile_kwargs={"literal_binds": True})
            plan = await connection.exec_driver_sql(f"EXPLAIN {compiled}")
            details = " ".join(str(row[0]) for row in plan)
    assert "ix_events_payload_expiry" in details, details


async def test_a_portals_newest_events_are_each_statuss_newest_merged(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    """Exact: the newest of a portal, by when they happened, whatever their status, their
    source or the order they arrived in (a backdated event arrives last), and only its."""
    start = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    statuses = [EventStatus.done, EventStatus.failed, EventStatus.pending, EventStatus.skipped]
    minutes = [5, 11, 2, 9, 7, 0, 10, 3, 8, 1, 6, 4]  # arrival order differs from time order
    events = [
        replace(
            call_event(f"evt-{minute}", portal_id=portal_id),
            occurred_at=start + timedelta(minutes=minute),
            source=EventSource.hubspot if minute == 10 else EventSource.receptionist,
        )
        for minute in minutes
        for portal_id in (1001, 1002)
    ]
    async with transaction(sessions) as session:
        await enqueue_many(
            events,
            session=session,
            cipher=cipher,
            statuses=[statuses[minute % 4] for minute in minutes for _ in (1001, 1002)],
        )

    async with sessions() as session:
        newest = await newest_of_portal(session, 1001, limit=5)
        calls = await newest_of_portal(session, 1001, limit=3, source=EventSource.receptionist)
        failed = await newest_of_portal(session, 1001, limit=9, statuses=[EventStatus.failed])

    def minute_of(event: InboxEvent) -> int:
        return int((event.occurred_at - start).total_seconds() // 60)

    assert {event.portal_id for event in newest + calls + failed} == {1001}
    assert [minute_of(event) for event in newest] == [11, 10, 9, 8, 7]
    assert [minute_of(event) for event in calls] == [11, 9, 8]
    assert [minute_of(event) for event in failed] == [9, 5, 1]


# --- group commit -------------------------------------------------------------------------


async def test_concurrent_intake_events_share_a_commit_and_are_stored_when_answered(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    writer = InboxWriter(sessions, cipher)
    answers = await asyncio.gather(*(writer.store(call_event(f"evt_{n}")) for n in range(50)))
    assert all(answer.created for answer in answers)
    assert len({answer.event_id for answer in answers}) == 50
    # Fifty requests arriving together: a couple of commits, not fifty.
    assert writer.commits <= 2
    async with sessions() as session:
        stored = (await session.execute(sa.select(col(InboxEvent.id)))).scalars().all()
    assert sorted(stored) == sorted(answer.event_id for answer in answers)


async def test_a_repeat_in_the_same_group_or_of_a_stored_event_is_a_duplicate(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    writer = InboxWriter(sessions, cipher)
    first = await writer.store(call_event("evt_a"))
    again, b1, b2 = await asyncio.gather(
        writer.store(call_event("evt_a")),
        writer.store(call_event("evt_b")),
        writer.store(call_event("evt_b", summary="resent")),
    )
    assert (again.event_id, again.created) == (first.event_id, False)
    assert b1.created
    assert not b2.created
    assert b2.event_id == b1.event_id
    assert await count_events(sessions) == 2


async def test_repeats_of_stored_events_are_named_by_one_query(
    engine: AsyncEngine, sessions: SessionFactory, cipher: TokenCipher
) -> None:
    """A sender retrying a whole burst costs one lookup per group, not one per repeat."""
    async with transaction(sessions) as session:
        stored = await enqueue_many(
            [call_event(f"evt_{n}") for n in range(20)], session=session, cipher=cipher
        )
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    # Repeats of the twenty (two of them twice), interleaved with twenty new events.
    burst = [call_event(f"evt_{n}") for n in (*range(20), 3, 7)]
    burst += [call_event(f"new_{n}") for n in range(20)]
    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        async with transaction(sessions) as session:
            answers = await enqueue_many(burst, session=session, cipher=cipher)
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)
    by_key = {f"evt_{n}": answer.event_id for n, answer in enumerate(stored)}
    for event, answer in zip(burst, answers, strict=True):
        if event.idempotency_key in by_key:
            assert (answer.event_id, answer.created) == (by_key[event.idempotency_key], False)
        else:
            assert answer.created
    assert await count_events(sessions) == 40
    data_statements = [s for s in statements if s in ("INSERT", "SELECT")]
    assert data_statements == ["INSERT", "SELECT"]


async def test_an_event_that_cannot_be_stored_does_not_fail_the_others_of_its_group(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    writer = InboxWriter(sessions, cipher)
    unstorable = call_event("evt_bad", detail=object())  # not JSON: encrypting it fails
    good, bad, other = await asyncio.gather(
        writer.store(call_event("evt_1")),
        writer.store(unstorable),
        writer.store(call_event("evt_2")),
        return_exceptions=True,
    )
    assert isinstance(bad, TypeError)
    assert isinstance(good, Enqueued)
    assert isinstance(other, Enqueued)
    assert good.created
    assert other.created
    assert await count_events(sessions) == 2


async def test_parked_and_pending_events_of_one_group_keep_their_status(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    writer = InboxWriter(sessions, cipher)
    pending, parked = await asyncio.gather(
        writer.store(call_event("evt_1", portal_id=1001)),
        writer.store(call_event("evt_1", portal_id=1002), status=EventStatus.parked),
    )
    async with sessions() as session:
        rows = dict(
            (await session.execute(sa.select(col(InboxEvent.id), col(InboxEvent.status)))).all()
        )
    assert rows == {pending.event_id: EventStatus.pending, parked.event_id: EventStatus.parked}
