"""The worker: order, isolation between portals, retries, parking, crashes and signals."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col

from app import db
from app.db import transaction
from app.errors import HubSpotUnavailable, PermanentError, PortalUnavailable
from app.inbox import (
    Done,
    EventView,
    HandlerContext,
    NewEvent,
    Registry,
    enqueue,
    unpark_portal_events,
)
from app.main import Services, close_services, open_services
from app.models import EventSource, EventStatus, InboxEvent, Portal, PortalLease, utcnow
from app.retry import RetryPolicy
from app.settings import Settings
from app.worker import Worker
from tests.conftest import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_KEY
from tests.outage import database_outage
from tests.webhook_support import add_portal

ROOT = Path(__file__).resolve().parent.parent
FAST_RETRIES = RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=3, outage_attempts=3)
BASE_TIME = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


@pytest.fixture
async def core(settings: Settings) -> AsyncIterator[Services]:
    resources = await open_services(settings)
    yield resources
    await close_services(resources)


async def add_events(
    core: Services,
    portal_id: int,
    count: int,
    *,
    event_type: str = "test.work",
    start: int = 0,
    source: EventSource = EventSource.internal,
) -> list[int]:
    """Enqueue `count` events with shuffled occurred_at; returns their ids in occurred_at order."""
    minutes = list(range(start, start + count))
    shuffled = random.sample(minutes, len(minutes))
    ids_by_minute = {}
    async with transaction(core.sessions) as session:
        for minute in shuffled:
            event = NewEvent(
                portal_id,
                source,
                event_type,
                f"{portal_id}-{event_type}-{minute}",
                BASE_TIME + timedelta(minutes=minute),
                {"minute": minute},
            )
            ids_by_minute[minute] = (
                await enqueue(event, session=session, cipher=core.cipher)
            ).event_id
    return [ids_by_minute[m] for m in minutes]


async def statuses(core: Services) -> dict[int, InboxEvent]:
    async with core.sessions() as session:
        return {e.id: e for e in (await session.execute(sa.select(InboxEvent))).scalars() if e.id}


@pytest.mark.parametrize("batch_size", [1, 7])
async def test_portal_events_are_handled_in_occurred_at_order(
    core: Services, batch_size: int
) -> None:
    registry = Registry()
    seen: list[int] = []

    @registry.handler("test.work", batch_size=batch_size)
    async def work(_context: HandlerContext, events: list[EventView]) -> None:
        assert len(events) <= batch_size
        seen.extend(e.payload["minute"] for e in events)

    await add_events(core, 1001, 25)
    await Worker(core, registry=registry, poll_seconds=0.01).drain(timeout=20)
    assert seen == list(range(25))
    assert {e.status for e in (await statuses(core)).values()} == {EventStatus.done}


async def test_a_slow_portal_does_not_delay_another(core: Services) -> None:
    registry = Registry()
    release = asyncio.Event()
    finished: dict[int, float] = {}

    @registry.handler("test.work")
    async def work(context: HandlerContext, _events: list[EventView]) -> None:
        if context.portal_id == 1:
            await release.wait()
        finished[context.portal_id] = time.monotonic()

    await add_events(core, 1, 1)
    await add_events(core, 2, 3)
    worker = Worker(core, registry=registry, poll_seconds=0.01)
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            while [e.status for e in (await statuses(core)).values() if e.portal_id == 2] != [
                EventStatus.done
            ] * 3:
                await asyncio.sleep(0.01)
        assert 1 not in finished, "the slow portal finished first?"
        release.set()
        async with asyncio.timeout(10):
            while 1 not in finished:
                await asyncio.sleep(0.01)
    finally:
        worker.stop()
        await running


async def test_a_portals_last_sync_is_when_one_of_its_receptionist_events_last_synced(
    core: Services,
) -> None:
    """The console reads it from the portal: written with the batch's outcomes, for
    receptionist events done, not for HubSpot's or for failures."""
    await add_portal(core.sessions, core.cipher, 1001)
    registry = Registry()

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        return {e.id: PermanentError("refused") for e in events if e.payload["minute"] >= 100}

    async def last_synced() -> datetime | None:
        async with core.sessions() as session:
            portal = await session.get(Portal, 1001, populate_existing=True)
            assert portal is not None
            return portal.last_synced_at

    worker = Worker(core, registry=registry, poll_seconds=0.01, retry_policy=FAST_RETRIES)
    await add_events(core, 1001, 2, source=EventSource.hubspot)
    await add_events(core, 1001, 2, start=100, source=EventSource.receptionist)
    await worker.drain(timeout=20)
    assert {e.status for e in (await statuses(core)).values()} == {
        EventStatus.done,
        EventStatus.failed,
    }
    assert await last_synced() is None

    before = utcnow()
    await add_events(core, 1001, 2, start=10, source=EventSource.receptionist)
    await worker.drain(timeout=20)
    after = utcnow()
    synced = await last_synced()
    assert synced is not None
    assert before <= synced <= after


async def test_a_portals_last_event_is_its_newest_receptionist_event_taken_up(
    core: Services,
) -> None:
    """The settings page's sign of a connected receptionist, read from the portal: failed
    events count, the owner's test events do not, and an older event never moves it back."""
    await add_portal(core.sessions, core.cipher, 1001)
    registry = Registry()

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        return {e.id: PermanentError("refused") for e in events}

    @registry.handler("test.ping")
    async def ping(_context: HandlerContext, _events: list[EventView]) -> None:
        return None

    async def portal() -> Portal:
        async with core.sessions() as session:
            found = await session.get(Portal, 1001, populate_existing=True)
            assert found is not None
            return found

    worker = Worker(core, registry=registry, poll_seconds=0.01, retry_policy=FAST_RETRIES)
    await add_events(core, 1001, 2, source=EventSource.receptionist)
    await worker.drain(timeout=20)
    newest = max(e.received_at for e in (await statuses(core)).values())
    assert {e.status for e in (await statuses(core)).values()} == {EventStatus.failed}
    assert (await portal()).last_event_at == newest
    assert (await portal()).last_synced_at is None

    await add_events(core, 1001, 1, event_type="test.ping", source=EventSource.receptionist)
    [older] = await add_events(core, 1001, 1, start=50, source=EventSource.receptionist)
    async with transaction(core.sessions) as session:
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id) == older)
            .values(received_at=newest - timedelta(hours=1))
        )
    await worker.drain(timeout=20)
    assert (await portal()).last_event_at == newest


async def test_a_handler_that_always_fails_ends_failed_with_its_last_error(core: Services) -> None:
    registry = Registry()
    calls = 0

    @registry.handler("test.work")
    async def work(_context: HandlerContext, _events: list[EventView]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError(f"HubSpot fell over (call {calls})")

    [event_id] = await add_events(core, 1001, 1)
    await Worker(core, registry=registry, retry_policy=FAST_RETRIES, poll_seconds=0.01).drain(
        timeout=20
    )
    event = (await statuses(core))[event_id]
    assert calls == 3
    assert event.status == EventStatus.failed
    assert event.attempts == 3
    assert event.last_error == "RuntimeError: HubSpot fell over (call 3)"


async def test_outcomes_that_cannot_be_recorded_are_retried_with_backoff_and_their_error(
    core: Services,
) -> None:
    registry = Registry()
    # Per call: when it started, and what the previous attempt left on the event.
    calls: list[tuple[datetime, datetime, str | None, int]] = []

    async def write(_session: Any) -> None:
        raise RuntimeError("the contacts table is locked")

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        started = utcnow()
        async with core.sessions() as session:
            stored = await session.get(InboxEvent, events[0].id)
            assert stored is not None
            calls.append((started, stored.run_after, stored.last_error, events[0].attempts))
        return {events[0].id: Done(write=write)}

    [event_id] = await add_events(core, 1001, 1)
    await Worker(core, registry=registry, retry_policy=FAST_RETRIES, poll_seconds=0.01).drain(
        timeout=20
    )
    assert [attempt for *_, attempt in calls] == [1, 2, 3]
    for (previous_start, *_), (_start, run_after, last_error, _attempt) in itertools.pairwise(
        calls
    ):
        # Put back by the retry policy when the write failed, not at once by recovery.
        assert run_after > previous_start
        assert last_error == "RuntimeError: the contacts table is locked"
    event = (await statuses(core))[event_id]
    assert event.status == EventStatus.failed
    assert event.attempts == 3
    assert event.last_error == "RuntimeError: the contacts table is locked"


async def test_outcomes_are_per_event_within_a_batch(core: Services) -> None:
    registry = Registry()

    @registry.handler("test.work", batch_size=10)
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        return {
            events[1].id: PermanentError("HubSpot rejected the email"),
            events[2].id: Done(result={"contact": "7"}, contact_id="7"),
        }

    ids = await add_events(core, 1001, 3)
    await Worker(core, registry=registry, retry_policy=FAST_RETRIES, poll_seconds=0.01).drain()
    events = await statuses(core)
    assert [events[i].status for i in ids] == ["done", "failed", "done"]
    assert events[ids[1]].last_error == "HubSpot rejected the email"
    assert events[ids[2]].contact_id == "7"


async def test_an_event_that_trips_a_bug_fails_alone_not_with_its_batch(core: Services) -> None:
    registry = Registry()
    runs: list[list[int]] = []

    @registry.handler("test.work", batch_size=10)
    async def work(_context: HandlerContext, events: list[EventView]) -> None:
        runs.append([e.payload["minute"] for e in events])
        if any(e.payload["minute"] == 4 for e in events):
            raise OverflowError("cannot convert float infinity to integer")

    ids = await add_events(core, 1001, 10)
    await Worker(core, registry=registry, retry_policy=FAST_RETRIES, poll_seconds=0.01).drain()

    events = await statuses(core)
    assert [events[i].status for i in ids] == ["done"] * 4 + ["failed"] + ["done"] * 5
    poisoned = events[ids[4]]
    assert poisoned.last_error == "OverflowError: cannot convert float infinity to integer"
    assert poisoned.attempts == 3
    assert {events[i].attempts for i in ids if i != ids[4]} == {1}
    # The batch, its halves, then the failing half's halves down to the one event.
    assert runs[:7] == [
        list(range(10)),
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [0, 1],
        [2, 3, 4],
        [2],
        [3, 4],
    ]


@pytest.mark.parametrize("error", [RuntimeError("a bug in every run"), HubSpotUnavailable("503")])
async def test_a_batch_failing_whole_is_retried_whole_without_hunting_for_one_event(
    core: Services, error: Exception
) -> None:
    registry = Registry()
    runs: list[int] = []

    @registry.handler("test.work", batch_size=10)
    async def work(_context: HandlerContext, events: list[EventView]) -> None:
        runs.append(len(events))
        raise error

    ids = await add_events(core, 1001, 10)
    await Worker(core, registry=registry, retry_policy=FAST_RETRIES, poll_seconds=0.01).drain()

    events = await statuses(core)
    assert {events[i].status for i in ids} == {EventStatus.failed}
    assert {events[i].attempts for i in ids} == {3}
    # Each attempt hands each event to the handler once, and a bug both halves meet once
    # more (in a half) before the hunt stops; HubSpot's failure, never more than once.
    handled = sum(runs)
    if isinstance(error, RuntimeError):
        assert 30 < handled <= 60, runs
    else:
        assert handled == 30, runs


@pytest.mark.parametrize(
    ("waiting", "fill_wait", "expected"),
    [
        # Fewer than a batch, not waited long: every other event passes them first.
        (3, timedelta(hours=1), [("work", 5)] * 4 + [("later", 3)]),
        # A whole batch is due: it goes at once.
        (4, timedelta(hours=1), [("later", 4)] + [("work", 5)] * 4),
        # Waited long enough: they go at once, a batch or not.
        (3, timedelta(0), [("later", 3)] + [("work", 5)] * 4),
    ],
)
async def test_events_that_wait_to_fill_a_batch_let_the_others_pass_until_they_should_go(
    core: Services, waiting: int, fill_wait: timedelta, expected: list[tuple[str, int]]
) -> None:
    registry = Registry()
    handled: list[tuple[str, int]] = []

    @registry.handler("test.work", batch_size=5)
    async def work(_context: HandlerContext, events: list[EventView]) -> None:
        handled.append(("work", len(events)))

    @registry.handler("test.later", batch_size=4, fill_wait=fill_wait)
    async def later(_context: HandlerContext, events: list[EventView]) -> None:
        handled.append(("later", len(events)))

    # The waiting events are older than some of the work and in the middle of the rest:
    # the runs of work are not cut at them.
    await add_events(core, 1001, 20, event_type="test.work", start=10)
    for n in range(waiting):
        await add_events(core, 1001, 1, event_type="test.later", start=n * 7)
    await Worker(core, registry=registry, poll_seconds=0.01).drain(timeout=20)
    assert handled == expected
    assert {e.status for e in (await statuses(core)).values()} == {EventStatus.done}


async def test_a_hubspot_subscription_without_handler_is_skipped(core: Services) -> None:
    [event_id] = await add_events(
        core, 1001, 1, event_type="deal.creation", source=EventSource.hubspot
    )
    await Worker(core, registry=Registry(), poll_seconds=0.01).drain()
    assert (await statuses(core))[event_id].status == EventStatus.skipped


@pytest.mark.parametrize("source", [EventSource.internal, EventSource.receptionist])
async def test_an_event_a_newer_version_made_waits_for_a_worker_that_handles_it(
    core: Services, source: EventSource
) -> None:
    """A rolling deploy: the new web process (or worker) stores a type the old worker does
    not know. The old worker leaves it, serving the portal's other events; the new one
    handles it."""
    [newer] = await add_events(core, 1001, 1, event_type="test.newer", source=source)
    others = await add_events(core, 1001, 3, start=5)
    old = Registry()

    @old.handler("test.work")
    async def work(_context: HandlerContext, _events: list[EventView]) -> None:
        pass

    before = utcnow()
    await Worker(core, registry=old, poll_seconds=0.01).drain(timeout=10)
    events = await statuses(core)
    assert [events[i].status for i in others] == [EventStatus.done] * 3
    waiting = events[newer]
    assert waiting.status == EventStatus.pending
    assert waiting.attempts == 0
    assert waiting.run_after >= before + timedelta(minutes=4)
    assert "waiting for a worker that has one" in (waiting.last_error or "")

    # Once due again, a worker of the newer version handles it.
    async with transaction(core.sessions) as session:
        await session.execute(
            sa.update(InboxEvent).where(InboxEvent.id == newer).values(run_after=utcnow())
        )
    new = Registry()
    handled: list[int] = []
    new.handler("test.work")(work)

    @new.handler("test.newer")
    async def newer_work(_context: HandlerContext, events: list[EventView]) -> None:
        handled.extend(e.id for e in events)

    await Worker(core, registry=new, poll_seconds=0.01).drain(timeout=10)
    assert handled == [newer]
    assert (await statuses(core))[newer].status == EventStatus.done


async def test_an_unavailable_portal_parks_its_events_until_unparked(core: Services) -> None:
    registry = Registry()
    unavailable = {1001}
    handled: list[int] = []

    @registry.handler("test.work")
    async def work(context: HandlerContext, events: list[EventView]) -> None:
        if context.portal_id in unavailable:
            raise PortalUnavailable(context.portal_id, "needs re-authorization")
        handled.extend(e.id for e in events)

    ids = await add_events(core, 1001, 4)
    other = await add_events(core, 1002, 1)
    worker = Worker(core, registry=registry, retry_policy=FAST_RETRIES, poll_seconds=0.01)
    await worker.drain()
    events = await statuses(core)
    assert [events[i].status for i in ids] == [EventStatus.parked] * 4
    assert [events[i].attempts for i in ids] == [0] * 4, "waiting must not burn attempts"
    assert handled == other, "another portal's events are not held up"
    unavailable.clear()
    await worker.drain()
    assert handled == other, "parked events wait until they are un-parked"
    async with transaction(core.sessions) as session:
        assert await unpark_portal_events(1001, session=session) == 4
    await worker.drain()
    assert handled == other + ids


async def test_done_is_not_recorded_when_another_worker_took_the_events(core: Services) -> None:
    registry = Registry()
    writes: list[int] = []

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        async with transaction(core.sessions) as session:
            # What a takeover after our lease expired looks like from the database.
            await session.execute(sa.update(InboxEvent).values(lease_owner="someone-else"))

        async def write(_session: Any) -> None:
            writes.append(events[0].id)

        return {events[0].id: Done(write=write)}

    [event_id] = await add_events(core, 1001, 1)
    worker = Worker(core, registry=registry, poll_seconds=0.01)
    await worker._fill_slots()
    await asyncio.gather(*worker._active.values())
    event = (await statuses(core))[event_id]
    assert event.status == EventStatus.in_progress
    assert event.lease_owner == "someone-else"
    assert writes == []


async def test_a_batch_that_outlasts_the_lease_keeps_it_while_its_worker_lives(
    core: Services,
) -> None:
    registry = Registry()
    handled_by: list[str] = []

    @registry.handler("test.work")
    async def work(context: HandlerContext, _events: list[EventView]) -> None:
        handled_by.append(context.worker_id)
        await asyncio.sleep(3.0)  # three leases long: only renewals keep it

    [event_id] = await add_events(core, 1001, 1)
    # A lease of 1 s (renewed every third of it) leaves room for a loaded machine: at
    # 0.3 s a renewal stuck behind SQLite's busy handler now and then came too late.
    workers = [
        Worker(core, registry=registry, poll_seconds=0.02, lease_seconds=1.0, worker_id=name)
        for name in ("first", "second")
    ]
    running = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        async with asyncio.timeout(15):
            while (await statuses(core))[event_id].status != EventStatus.done:
                await asyncio.sleep(0.05)
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)
    assert len(handled_by) == 1, f"taken over while its worker was alive: {handled_by}"
    assert (await statuses(core))[event_id].attempts == 1


async def test_a_worker_that_lost_a_portals_lease_stops_serving_it(core: Services) -> None:
    registry = Registry()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @registry.handler("test.work")
    async def work(_context: HandlerContext, _events: list[EventView]) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    [event_id] = await add_events(core, 1001, 1)
    worker = Worker(core, registry=registry, poll_seconds=0.02, lease_seconds=0.3)
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            await started.wait()
            async with transaction(core.sessions) as session:
                # Another worker took the portal while this one could not renew (a long
                # pause, a partition): its next heartbeat finds the lease gone.
                await session.execute(sa.update(PortalLease).values(owner="someone-else"))
            await cancelled.wait()
    finally:
        worker.stop()
        await running
    event = (await statuses(core))[event_id]
    assert event.status != EventStatus.done, "the handler was stopped, not finished"


async def test_a_worker_that_lost_a_portals_lease_records_and_claims_nothing_more_of_it(
    core: Services,
) -> None:
    registry = Registry()
    handled: list[int] = []
    writes: list[int] = []

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        handled.extend(e.id for e in events)
        if len(handled) == 1:
            async with transaction(core.sessions) as session:
                # Another worker took the portal over before this one's next heartbeat.
                await session.execute(sa.update(PortalLease).values(owner="someone-else"))

        async def write(_session: Any) -> None:
            writes.extend(e.id for e in events)

        return {e.id: Done(write=write) for e in events}

    first, *later = await add_events(core, 1001, 3)
    worker = Worker(core, registry=registry, poll_seconds=0.01)
    await worker._fill_slots()
    await asyncio.gather(*worker._active.values())
    events = await statuses(core)
    assert handled == [first]
    assert writes == []
    assert events[first].status == EventStatus.in_progress, "left for the new owner to recover"
    assert [events[i].status for i in later] == [EventStatus.pending] * 2
    assert [events[i].attempts for i in later] == [0, 0]


async def test_a_heartbeat_cancels_no_task_that_replaced_the_one_it_found(core: Services) -> None:
    worker = Worker(core, registry=Registry(), poll_seconds=0.01)
    async with transaction(core.sessions) as session:
        for portal_id in (1, 2):
            session.add(
                PortalLease(
                    portal_id=portal_id,
                    owner=worker.worker_id,
                    expires_at=utcnow() + timedelta(seconds=30),
                )
            )
    replaced, ended, replacement = (asyncio.create_task(asyncio.sleep(30)) for _ in range(3))
    worker._active = {1: replaced, 2: ended}
    try:
        async with transaction(core.sessions) as session:
            # Holding the lease rows (PostgreSQL) or the database (SQLite) keeps the renewal
            # waiting after it has looked at the portals' tasks.
            await session.execute(sa.update(PortalLease).values(owner="someone-else"))
            renewal = asyncio.create_task(worker._renew_leases())
            await asyncio.sleep(0.05)
            # Meanwhile portal 2's task ended, and portal 1's was followed by a new one.
            worker._active = {1: replacement}
        await renewal
        assert not replacement.cancelling()
    finally:
        for task in (replaced, ended, replacement):
            task.cancel()
        await asyncio.gather(replaced, ended, replacement, return_exceptions=True)


async def test_a_batch_cancelled_while_its_outcomes_are_recorded_still_records_them(
    core: Services,
) -> None:
    registry = Registry()
    writing = asyncio.Event()
    release = asyncio.Event()

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        async def write(_session: Any) -> None:
            writing.set()
            await release.wait()

        return {events[0].id: Done(write=write)}

    [event_id] = await add_events(core, 1001, 1)
    worker = Worker(core, registry=registry, poll_seconds=0.01)
    await worker._fill_slots()
    [serving] = worker._active.values()
    async with asyncio.timeout(10):
        await writing.wait()
    # The grace period ends (or the lease is lost) while the handler's work is recorded.
    serving.cancel()
    await asyncio.sleep(0.05)
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await serving
    event = (await statuses(core))[event_id]
    assert event.status == EventStatus.done, "the finished work was recorded, not dropped"
    assert event.attempts == 1


# --- real worker processes ---------------------------------------------------------------


async def _set_schema_revision(core: Services, revision: str | None) -> None:
    async with transaction(core.sessions) as session:
        await session.execute(sa.text("DELETE FROM alembic_version"))
        if revision is not None:
            await session.execute(
                sa.text("INSERT INTO alembic_version (version_num) VALUES (:revision)"),
                {"revision": revision},
            )


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "app.worker" and text in r.getMessage()]


def _recording_registry() -> tuple[Registry, list[int]]:
    """A registry whose `test.work` handler records the ids of the events it handled."""
    handled: list[int] = []
    registry = Registry()

    @registry.handler("test.work")
    async def work(_context: HandlerContext, events: list[EventView]) -> None:
        handled.extend(event.id for event in events)

    return registry, handled


async def test_a_worker_waits_for_the_schema_and_says_why_once(
    core: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Started before `hubline migrate` (a rolling deploy), it claims nothing until the
    schema is there, and says so once rather than failing every turn."""
    caplog.set_level(logging.INFO, logger="app.worker")
    registry, handled = _recording_registry()
    [event_id] = await add_events(core, 1, 1)
    head = db.head_revision()
    await _set_schema_revision(core, None)
    worker = Worker(core, registry=registry, poll_seconds=0.01, database_wait_seconds=0.05)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.5)  # ten checks of the schema
        assert handled == []
        waiting = _messages(caplog, "worker waiting")
        assert len(waiting) == 1
        assert waiting[0].levelno == logging.WARNING
        assert "no Hubline schema" in waiting[0].getMessage()
        assert "run `hubline migrate`" in waiting[0].getMessage()
        await _set_schema_revision(core, head)
        async with asyncio.timeout(10):
            while handled != [event_id]:
                await asyncio.sleep(0.01)
        assert len(_messages(caplog, "the database is ready")) == 1
    finally:
        worker.stop()
        await running


async def test_a_worker_waiting_for_the_schema_stops_at_once(
    core: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.worker")
    await _set_schema_revision(core, None)
    worker = Worker(core, registry=Registry(), database_wait_seconds=60)
    running = asyncio.create_task(worker.run())
    async with asyncio.timeout(5):
        while not _messages(caplog, "worker waiting"):
            await asyncio.sleep(0.01)
    worker.stop()
    # Well inside the 60 s between checks: the stop ends the wait itself.
    async with asyncio.timeout(5):
        await running
    assert not _messages(caplog, "claiming portals failed")


# SQLite's outage moves the file aside and disposes of the engine, which cannot close the
# connections the worker's loops hold at that moment (they would be collected later,
# unclosed); PostgreSQL's outage takes the database away under the same engine.
@pytest.mark.postgres_only
async def test_a_database_outage_is_logged_once_and_its_end_too(
    core: Services, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each turn of the claim loop fails while the database is away: one error with its
    traceback, not one per turn, then a line when claiming works again."""
    caplog.set_level(logging.DEBUG, logger="app.worker")
    registry, handled = _recording_registry()
    worker = Worker(core, registry=registry, poll_seconds=0.01)
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            while not _messages(caplog, "worker started"):
                await asyncio.sleep(0.01)
        async with database_outage(core.engine, database_url):
            async with asyncio.timeout(10):
                while len(_messages(caplog, "claiming portals failed")) < 50:
                    await asyncio.sleep(0.01)
        failures = _messages(caplog, "claiming portals failed")
        reported = [r for r in failures if r.levelno >= logging.WARNING]
        # The first turn may meet the connection being cut, the next the database gone.
        assert 1 <= len(reported) <= 2
        assert all(r.exc_info for r in reported), "the first report carries its traceback"
        assert all(r.levelno == logging.DEBUG for r in failures if r not in reported)
        ids = await add_events(core, 1, 2)
        async with asyncio.timeout(10):
            while sorted(handled) != sorted(ids):
                await asyncio.sleep(0.01)
        [back] = _messages(caplog, "claiming portals works again")
        assert back.levelno == logging.INFO
    finally:
        worker.stop()
        await running


async def test_a_periodic_job_meeting_hubspot_trouble_logs_one_line_a_bug_its_traceback(
    core: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.worker")
    runs = {"journal": 0, "buggy": 0}

    async def journal(_services: Services) -> None:
        runs["journal"] += 1
        raise HubSpotUnavailable("journal read: HubSpot did not answer (ConnectError)")

    async def buggy(_services: Services) -> None:
        runs["buggy"] += 1
        raise RuntimeError("a bug")

    worker = Worker(core, registry=Registry(), poll_seconds=0.01)
    worker.add_periodic("journal", 0.01, journal)
    worker.add_periodic("buggy", 0.01, buggy)
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            while min(runs.values()) < 3:
                await asyncio.sleep(0.01)
    finally:
        worker.stop()
        await running
    [outage] = [
        r for r in _messages(caplog, "periodic job journal failed") if r.levelno > logging.DEBUG
    ]
    assert outage.levelno == logging.WARNING
    assert outage.exc_info is None
    assert "HubSpot did not answer (ConnectError)" in outage.getMessage()
    [bug] = [r for r in _messages(caplog, "periodic job buggy failed") if r.levelno > logging.DEBUG]
    assert bug.levelno == logging.ERROR
    assert bug.exc_info is not None


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "HUBSPOT_CLIENT_ID": TEST_CLIENT_ID,
        "HUBSPOT_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
        "JOURNAL_POLL_SECONDS": "0",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


class WorkerProcess:
    def __init__(self, env: dict[str, str]) -> None:
        # The worker's log, kept for a failure's message: a hang is otherwise a mystery.
        # Appending: the worker's writes land at the end whatever our reads' offset.
        self.log = tempfile.TemporaryFile("a+")  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "worker_process.py")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
        )
        self.lines: list[str] = []

    def log_tail(self, characters: int = 6000) -> str:
        self.log.seek(0)
        return self.log.read()[-characters:]

    async def wait_for(self, prefix: str, timeout: float = 30) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = await asyncio.to_thread(self.process.stdout.readline)
            if not line:
                break
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(
            f"worker never printed {prefix!r}; it printed {self.lines}; "
            f"its log ends:\n{self.log_tail()}"
        )

    def kill(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            # Where it is stuck: worker_process.py prints its threads on SIGUSR1 and its
            # asyncio tasks on SIGUSR2.
            for signum in (signal.SIGUSR1, signal.SIGUSR2):
                self.process.send_signal(signum)
            await asyncio.sleep(1)
            raise AssertionError(
                f"the worker did not exit within {timeout} s; its log ends:\n{self.log_tail()}"
            ) from None

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


@pytest.fixture
async def handled_table(core: Services) -> Callable[[], Any]:
    async with transaction(core.sessions) as session:
        await session.execute(
            sa.text(
                "CREATE TABLE test_handled (event_id BIGINT, portal_id BIGINT, worker TEXT, "
                "started DOUBLE PRECISION, finished DOUBLE PRECISION)"
            )
        )

    async def rows() -> list[tuple[int, int, str, float, float]]:
        async with core.sessions() as session:
            result = await session.execute(sa.text("SELECT * FROM test_handled"))
            return [tuple(row) for row in result]  # type: ignore[misc]

    return rows


async def wait_until_all_done(core: Services, timeout: float = 60) -> dict[int, InboxEvent]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await statuses(core)
        if all(e.status == EventStatus.done for e in events.values()):
            return events
        await asyncio.sleep(0.1)
    raise AssertionError(f"not all done: {[(e.id, e.status) for e in events.values()]}")


@pytest.mark.slow
async def test_a_killed_worker_is_taken_over_and_every_event_is_done_once(
    core: Services, settings: Settings, handled_table: Callable[[], Any]
) -> None:
    ids = await add_events(core, 1001, 30)
    doomed_env = worker_env(settings, HANDLER_SECONDS="30", LEASE_SECONDS="1", WORKER_ID="doomed")
    with WorkerProcess(doomed_env) as doomed:
        await doomed.wait_for("handling")
        doomed.kill(signal.SIGKILL)
        await doomed.wait()
    in_flight = [e for e in (await statuses(core)).values() if e.status == EventStatus.in_progress]
    assert in_flight, "the SIGKILL should have left a batch in progress"
    with WorkerProcess(worker_env(settings, LEASE_SECONDS="1", WORKER_ID="heir")) as heir:
        events = await wait_until_all_done(core)
        heir.kill(signal.SIGTERM)
        assert await heir.wait() == 0
    handled = await handled_table()
    assert sorted(row[0] for row in handled) == sorted(ids), "each event completed exactly once"
    assert {row[2] for row in handled} == {"heir"}
    assert all(events[i].attempts >= 1 for i in ids)


@pytest.mark.slow
async def test_sigterm_releases_a_long_batch_which_is_later_handled_once(
    core: Services, settings: Settings, handled_table: Callable[[], Any]
) -> None:
    ids = await add_events(core, 1001, 3)
    env = worker_env(
        settings,
        HANDLER_SECONDS="60",
        GRACE_SECONDS="0.3",
        WORKER_ID="stopping",
        AMBIGUOUS_WRITE_DELAY="3",
    )
    with WorkerProcess(env) as stopping:
        await stopping.wait_for("handling")
        stopping_from = utcnow()
        stopping.kill(signal.SIGTERM)
        assert await stopping.wait(timeout=15) == 0
    released_by = utcnow()
    events = await statuses(core)
    assert [events[i].status for i in ids] == [EventStatus.pending] * 3
    assert [events[i].attempts for i in ids] == [0] * 3, "a released attempt does not count"
    # The stopped handler may have made contacts HubSpot's search does not show yet: the
    # events wait the ambiguous write's 3 s from their release, which came in between
    # (bounds that hold however long a loaded machine takes to stop the process).
    delay = timedelta(seconds=3)
    for event_id in ids:
        assert stopping_from + delay <= events[event_id].run_after <= released_by + delay
    with WorkerProcess(worker_env(settings, WORKER_ID="next")) as following:
        await wait_until_all_done(core)
        following.kill(signal.SIGTERM)
        await following.wait()
    assert sorted(row[0] for row in await handled_table()) == sorted(ids)


@pytest.mark.slow
@pytest.mark.postgres_only
async def test_two_workers_never_serve_one_portal_at_once(
    core: Services, settings: Settings, handled_table: Callable[[], Any]
) -> None:
    ids = []
    for portal_id in range(1, 13):
        ids += await add_events(core, portal_id, 15)
    extra = {"HANDLER_SECONDS": "0.05", "BATCH_SIZE": "3", "CONCURRENCY": "4"}
    with (
        WorkerProcess(worker_env(settings, WORKER_ID="one", **extra)),
        WorkerProcess(worker_env(settings, WORKER_ID="two", **extra)),
    ):
        await wait_until_all_done(core, timeout=120)
    handled = await handled_table()
    assert sorted(row[0] for row in handled) == sorted(ids)
    assert {row[2] for row in handled} == {"one", "two"}, "both workers should have taken part"
    by_portal: dict[int, list[tuple[float, float, str]]] = {}
    for _event, portal_id, worker, started, finished in handled:
        by_portal.setdefault(portal_id, []).append((started, finished, worker))
    for spans in by_portal.values():
        spans = sorted(set(spans))
        for (_s1, end1, w1), (start2, _e2, w2) in itertools.pairwise(spans):
            assert w1 == w2 or start2 >= end1, "two workers handled one portal at the same time"


# --- a handler letting the portal's next batch start before its own end ------------------


async def test_a_handler_can_let_the_next_batch_start_alongside_at_most_one(
    core: Services,
) -> None:
    registry = Registry()
    running = 0
    most_at_once = 0
    seen: list[int] = []

    @registry.handler("test.work", batch_size=5)
    async def work(context: HandlerContext, events: list[EventView]) -> None:
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        seen.extend(e.payload["minute"] for e in events)  # the part the next batch waits for
        context.let_next_batch_start()
        await asyncio.sleep(0.05)  # the rest overlaps the next batch
        running -= 1

    await add_events(core, 1001, 40)
    await Worker(core, registry=registry, poll_seconds=0.01).drain(timeout=20)
    assert most_at_once == 2
    assert seen == list(range(40)), "the part before the signal still runs in order"
    events = (await statuses(core)).values()
    assert {e.status for e in events} == {EventStatus.done}
    assert {e.attempts for e in events} == {1}


async def test_a_batch_never_overlaps_unless_its_handler_says_so(core: Services) -> None:
    registry = Registry()
    running = 0
    most_at_once = 0

    @registry.handler("test.work", batch_size=5)
    async def work(_context: HandlerContext, _events: list[EventView]) -> None:
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        await asyncio.sleep(0.02)
        running -= 1

    await add_events(core, 1001, 20)
    await Worker(core, registry=registry, poll_seconds=0.01).drain(timeout=20)
    assert most_at_once == 1


async def test_another_handlers_run_waits_for_the_overlapping_batch_to_end(
    core: Services,
) -> None:
    registry = Registry()
    log: list[str] = []

    @registry.handler("test.work", batch_size=5)
    async def work(context: HandlerContext, events: list[EventView]) -> None:
        log.append(f"work starts {events[0].payload['minute']}")
        context.let_next_batch_start()
        await asyncio.sleep(0.05)
        log.append(f"work ends {events[0].payload['minute']}")

    @registry.handler("test.other")
    async def other(_context: HandlerContext, events: list[EventView]) -> None:
        log.append(f"other {events[0].payload['minute']}")

    await add_events(core, 1001, 5)  # minutes 0-4: one batch of test.work
    await add_events(core, 1001, 1, event_type="test.other", start=5)
    await add_events(core, 1001, 5, start=6)
    await Worker(core, registry=registry, poll_seconds=0.01).drain(timeout=20)
    assert log == ["work starts 0", "work ends 0", "other 5", "work starts 6", "work ends 6"]


async def test_a_failing_overlapped_batch_is_retried_and_the_other_is_kept(
    core: Services,
) -> None:
    registry = Registry()
    failed_once: set[int] = set()

    @registry.handler("test.work", batch_size=5)
    async def work(context: HandlerContext, events: list[EventView]) -> dict[int, Any]:
        context.let_next_batch_start()
        await asyncio.sleep(0.02)
        first = events[0].payload["minute"]
        if first == 0 and first not in failed_once:
            failed_once.add(first)
            raise HubSpotUnavailable("HubSpot went away after the contacts were written")
        return {e.id: Done() for e in events}

    await add_events(core, 1001, 15)
    await Worker(core, registry=registry, poll_seconds=0.01, retry_policy=FAST_RETRIES).drain(
        timeout=20
    )
    events = sorted((await statuses(core)).values(), key=lambda e: e.occurred_at)
    assert [e.status for e in events] == [EventStatus.done] * 15
    assert [e.attempts for e in events] == [2] * 5 + [1] * 10
