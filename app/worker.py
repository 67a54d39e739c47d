"""The worker: serves portals with due events, one worker per portal at a time.

A worker claims a portal by taking its lease (a row in `portal_leases`), takes the
portal's due events in `occurred_at` order in batches, hands each batch to the
handler registered for its type, and records every outcome in one transaction
that also checks it still holds the portal and the events. Leases are renewed
while work runs; an expired lease (a crashed worker) is taken over and its
in-flight events are put back. Many portals are served at once by separate
tasks, so a portal waiting on HubSpot never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app import identity
from app.db import DATABASE_ERRORS, schema_trouble, transaction
from app.errors import CryptoError, HandlerError, HublineError, HubSpotError
from app.hubspot.client import before_write
from app.inbox import (
    Done,
    EventView,
    HandlerContext,
    HandlerSpec,
    Outcome,
    Registry,
    Write,
    load_handlers,
    park_portal_events,
    purge_expired_parked,
    purge_expired_payloads,
    read_payload,
)
from app.logs import hubspot_error_fields, portal_id_var, redact_text
from app.metrics import EVENTS_HANDLED, RECEIPT_TO_SYNCED
from app.models import (
    PRIVACY_DELETION,
    EventSource,
    EventStatus,
    InboxEvent,
    Lease,
    OAuthState,
    Portal,
    PortalLease,
    PortalStatus,
    UTCDateTime,
    utcnow,
)
from app.receptionist import PING
from app.retry import DEFAULT_POLICY, Action, RetryPolicy

if TYPE_CHECKING:
    from sqlalchemy import Select

    from app.main import Services

log = logging.getLogger(__name__)

MAX_FETCH = 100
# A portal with a deep backlog gives its slot back after this many batches, so
# portals waiting behind it are not starved when every slot is busy.
BATCHES_PER_TURN = 10
MAX_ERROR_LENGTH = 2000
# Events no handler takes are skipped only when HubSpot sent them (subscriptions Hubline
# does not use); any other was made by a newer Hubline (a rolling deploy) and waits this
# long before this worker looks at it again.
SKIPPED_WHEN_UNHANDLED = EventSource.hubspot
NEWER_TYPE_WAIT = timedelta(minutes=5)
# Marks one handled event done; run with a parameter set per event (one executemany).
# The caller has checked, with the rows locked, that it still holds them.
_MARK_DONE = (
    sa.update(InboxEvent)
    .where(col(InboxEvent.id) == sa.bindparam("b_id"))
    .values(
        status=EventStatus.done,
        lease_owner=None,
        lease_expires_at=None,
        last_error=None,
        result=sa.bindparam("b_result"),
        contact_id=sa.func.coalesce(sa.bindparam("b_contact_id"), col(InboxEvent.contact_id)),
    )
)

PeriodicJob = Callable[["Services"], Awaitable[None]]


class _FailureLog:
    """A loop's failures, logged without a flood."""

    # An error that repeats turn after turn (the database down for a minute) is logged
    # once, with its traceback (HubSpot's errors in one line), and so is its end.

    def __init__(self, doing: str) -> None:
        self.doing = doing
        self.failures = 0
        self._last: str | None = None

    def failed(self, error: BaseException) -> None:
        """Record a failure; call it in the `except` block, whose traceback the log takes."""
        self.failures += 1
        seen = describe_error(error)
        if seen == self._last:
            log.debug("%s failed again (%d in a row)", self.doing, self.failures)
            return
        self._last = seen
        if isinstance(error, HubSpotError):
            # HubSpot down or refusing (a periodic job's calls): what it answered says it
            # all; a traceback is for Hubline's own faults.
            log.warning("%s failed; retrying: %s", self.doing, seen)
            return
        log.exception("%s failed; retrying", self.doing)

    def succeeded(self) -> None:
        if self._last is not None:
            log.info("%s works again after %d failures", self.doing, self.failures)
        self.failures = 0
        self._last = None


@dataclass
class _Periodic:
    name: str
    every_seconds: float
    job: PeriodicJob
    next_run: float = 0.0
    failure_log: _FailureLog = field(init=False)

    def __post_init__(self) -> None:
        self.failure_log = _FailureLog(f"periodic job {self.name}")


@dataclass
class _Batch:
    portal_id: int
    spec: HandlerSpec
    events: list[InboxEvent]


@dataclass
class _Decided:
    """An event of a batch that did not end done: what is recorded for it, and why."""

    row: InboxEvent
    error: BaseException
    action: Action
    values: dict[str, Any]


@dataclass
class _Record:
    """A batch's outcomes as the record writes them, then logs and counts them."""

    done: list[dict[str, Any]] = field(default_factory=list)  # _MARK_DONE's parameters
    decided: list[_Decided] = field(default_factory=list)
    # A handler may give many events one write (a batch's records in one statement):
    # each distinct write runs once.
    writes: dict[Write, None] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # receipt to synced, of the done
    keep_serving: bool = True
    synced_receptionist_events: bool = False  # the portal's last sync is now
    newest_received: datetime | None = None  # of its receptionist events, tests aside


@dataclass
class _Running:
    """A batch being handled, and the context its handler signals through."""

    batch: _Batch
    context: HandlerContext
    task: asyncio.Task[bool]

    async def until_next_may_start(self) -> None:
        """Wait until the handler lets the next batch start, or the batch ends."""
        may_start = asyncio.ensure_future(self.context.next_batch_may_start.wait())
        try:
            await asyncio.wait([self.task, may_start], return_when=asyncio.FIRST_COMPLETED)
        finally:
            may_start.cancel()

    async def ended(self) -> bool:
        """Wait for the batch; True when the portal may be served on."""
        try:
            return await self.task
        except Exception:
            log.exception("a batch failed; its events will be taken up again")
            return False

    async def finish(self) -> None:
        """Let the batch end even while our own task is being cancelled."""
        try:
            await asyncio.shield(self.ended())
        except asyncio.CancelledError:
            # Cancelled while waiting: cancel the batch too (it releases its events).
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


# What a handler raises when HubSpot, the network or the database fails it: no event's
# data is at fault, so a failing batch is not split to find one.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    HandlerError,
    HubSpotError,
    httpx.HTTPError,
    *DATABASE_ERRORS,
)


class LeaseLost(Exception):
    """Another worker took over the portal or its events (our lease expired); nothing recorded."""


class Worker:
    """Claims portals with due events and runs their handlers."""

    def __init__(
        self,
        services: Services,
        *,
        concurrency: int = 16,
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.5,
        grace_seconds: float = 20.0,
        database_wait_seconds: float = 5.0,
        retry_policy: RetryPolicy = DEFAULT_POLICY,
        registry: Registry | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.services = services
        self.concurrency = concurrency
        self.lease = timedelta(seconds=lease_seconds)
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.database_wait_seconds = database_wait_seconds
        self.retry_policy = retry_policy
        self.registry = registry if registry is not None else load_handlers()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._active: dict[int, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._periodic: list[_Periodic] = []
        self.add_periodic("retention", 600.0, _retention)

    @property
    def _postgres(self) -> bool:
        return not self.services.settings.is_sqlite

    def add_periodic(self, name: str, every_seconds: float, job: PeriodicJob) -> None:
        """Run `job` every `every_seconds` in at most one worker across all processes."""
        self._periodic.append(_Periodic(name, every_seconds, job))

    def stop(self) -> None:
        """Stop claiming; in-flight batches finish or are released within the grace period."""
        self._stopping.set()

    # --- the loops ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve portals until `stop()`; then finish or release in-flight work."""
        log.info("worker started", extra={"worker_id": self.worker_id})
        await self._wait_for_database()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        periodic = asyncio.create_task(self._periodic_loop(), name="worker-periodic")
        claiming = _FailureLog("claiming portals")
        try:
            while not self._stopping.is_set():
                try:
                    await self._fill_slots()
                except Exception as error:
                    claiming.failed(error)
                else:
                    claiming.succeeded()
                await self._wait_for_work()
        finally:
            periodic.cancel()
            await self._shutdown()
            heartbeat.cancel()
            for task in (heartbeat, periodic):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    async def _wait_for_database(self) -> None:
        """Return once the database answers with a schema this code can use (or on `stop()`)."""
        # A rolling deploy may start workers before `hubline migrate` has run, and a
        # worker may start while the database is down: until then it says once why it
        # waits, instead of failing every turn of its loops.
        told: str | None = None
        while not self._stopping.is_set():
            trouble = await schema_trouble(self.services.engine)
            if trouble is None:
                if told is not None:
                    log.info("the database is ready; worker serving")
                return
            if trouble != told:
                log.warning("worker waiting: %s", trouble)
                told = trouble
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.database_wait_seconds)

    async def run_until_signalled(self, on_signal: Callable[[], None] | None = None) -> None:
        """`run()`, stopping gracefully on SIGTERM or SIGINT (calling `on_signal` too)."""

        def signalled() -> None:
            if on_signal is not None:
                on_signal()
            self.stop()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signalled)
        try:
            await self.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (a deadline, not a cancel scope)
        """Handle events until none this worker can handle is pending or in progress (for
        tests and one-off runs)."""
        deadline = time.monotonic() + timeout
        while True:
            await self._fill_slots()
            if self._active:
                await asyncio.wait(list(self._active.values()), timeout=self.poll_seconds)
                continue
            if not await self._has_unfinished_events():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"events still unfinished after {timeout} s")
            await asyncio.sleep(min(self.poll_seconds, 0.05))

    async def _wait_for_work(self) -> None:
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._stopping.wait())]
        if len(self._active) >= self.concurrency:
            waiters.extend(self._active.values())
        await asyncio.wait(waiters, timeout=self.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
        waiters[0].cancel()

    async def _fill_slots(self) -> None:
        self._active = {p: t for p, t in self._active.items() if not t.done()}
        free = self.concurrency - len(self._active)
        if free <= 0 or self._stopping.is_set():
            return
        for portal_id in await self._claim_portals(free):
            self._active[portal_id] = asyncio.create_task(
                self._serve_portal(portal_id), name=f"portal-{portal_id}"
            )

    async def _shutdown(self) -> None:
        tasks = [task for task in self._active.values() if not task.done()]
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=self.grace_seconds)
            for task in still_running:
                task.cancel()
            for task in still_running:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._active.clear()

    # --- claiming portals -----------------------------------------------------------

    async def _claim_portals(self, limit: int) -> list[int]:
        """Take the leases of up to `limit` portals with due work, oldest work first."""
        now = utcnow()
        live_leases = sa.select(col(PortalLease.portal_id)).where(col(PortalLease.expires_at) > now)
        due = sa.func.min(col(InboxEvent.run_after))
        query = (
            sa.select(col(InboxEvent.portal_id))
            .where(
                sa.or_(
                    sa.and_(
                        col(InboxEvent.status) == EventStatus.pending,
                        col(InboxEvent.run_after) <= now,
                    ),
                    # In progress with no live portal lease: its worker died.
                    col(InboxEvent.status) == EventStatus.in_progress,
                ),
                col(InboxEvent.portal_id).not_in(live_leases),
            )
            .group_by(col(InboxEvent.portal_id))
            .order_by(due)
            .limit(limit + len(self._active))
        )
        async with transaction(self.services.sessions) as session:
            candidates = [
                p for p in (await session.execute(query)).scalars() if p not in self._active
            ]
            claimed = []
            for portal_id in candidates[:limit]:
                if await self._acquire_portal(portal_id, session=session):
                    claimed.append(portal_id)
        return claimed

    async def _acquire_portal(self, portal_id: int, *, session: AsyncSession) -> bool:
        now = utcnow()
        insert = pg_insert if self._postgres else sqlite_insert
        statement = (
            insert(PortalLease)
            .values(portal_id=portal_id, owner=self.worker_id, expires_at=now + self.lease)
            .on_conflict_do_update(
                index_elements=["portal_id"],
                set_={"owner": self.worker_id, "expires_at": now + self.lease},
                # Only a free or expired lease changes hands; on PostgreSQL a
                # concurrent claimer waits on the row and then sees it taken.
                where=sa.or_(
                    col(PortalLease.expires_at).is_(None), col(PortalLease.expires_at) < now
                ),
            )
            .returning(col(PortalLease.portal_id))
        )
        return (await session.execute(statement)).scalar_one_or_none() is not None

    async def _release_portal(self, portal_id: int) -> None:
        async with transaction(self.services.sessions) as session:
            await session.execute(
                sa.update(PortalLease)
                .where(
                    col(PortalLease.portal_id) == portal_id,
                    col(PortalLease.owner) == self.worker_id,
                )
                .values(owner=None, expires_at=None)
            )

    # --- serving one portal ---------------------------------------------------------

    async def _serve_portal(self, portal_id: int) -> None:
        token = portal_id_var.set(portal_id)
        # A handler can let the portal's next batch start before its own end
        # (`HandlerContext.let_next_batch_start`): `previous` is then still finishing
        # while `current` runs. Never more than these two.
        previous: _Running | None = None
        current: _Running | None = None
        try:
            for batch_number in range(BATCHES_PER_TURN):
                if self._stopping.is_set():
                    break
                if previous is not None and previous.task.done():
                    if not await previous.ended():
                        break
                    previous = None
                alongside = previous.batch.spec if previous is not None else None
                # Recovery runs once per turn: after it, every in-progress event is ours.
                batch = await self._claim_batch(
                    portal_id, recover=batch_number == 0, only=alongside
                )
                if batch is None and previous is not None:
                    # What is due next is not for the handler in flight (another handler's,
                    # or nothing yet): it waits for that batch to end.
                    if not await previous.ended():
                        break
                    previous = None
                    batch = await self._claim_batch(portal_id)
                if batch is None:
                    break
                current = self._start(batch)
                await current.until_next_may_start()
                if previous is not None and not await previous.ended():
                    break
                previous, current = current, None
        except asyncio.CancelledError:
            for running in (previous, current):
                if running is not None:
                    running.task.cancel()
            raise
        except Exception:
            log.exception("serving a portal failed; its lease will be released")
        finally:
            # A batch still in flight ends (recording its outcomes, or releasing its events
            # when cancelled) before the portal's lease is given back.
            for running in (previous, current):
                if running is not None and not running.task.done():
                    await running.finish()
            portal_id_var.reset(token)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release_portal(portal_id))

    async def _claim_batch(
        self, portal_id: int, *, recover: bool = False, only: HandlerSpec | None = None
    ) -> _Batch | None:
        """Mark the portal's next run of due events of one handler as ours; None when idle."""
        # `recover` first puts back what a crashed worker left in progress: needed once,
        # on the first claim after taking the portal's lease. With `only`, the run is
        # claimed only if that handler takes it (None otherwise).
        while True:
            now = utcnow()
            async with transaction(self.services.sessions) as session:
                if not await self._hold_portal(portal_id, session=session):
                    log.warning("lost the lease of a portal; claiming no more of its events")
                    return None
                if recover:
                    await self._recover_abandoned(portal_id, session=session)
                    recover = False
                # A privacy deletion goes before everything else of the portal: a call
                # dated earlier but still pending would otherwise recreate the person.
                erasures = await session.execute(self._erasures_due(portal_id))
                rows = [row for row in erasures.scalars() if row.run_after <= now]
                filling = self.registry.filling_types if not rows else ()
                if not rows:
                    query = self._due(portal_id, now).order_by(
                        col(InboxEvent.occurred_at), col(InboxEvent.id)
                    )
                    if filling:
                        query = query.where(col(InboxEvent.type).not_in(filling))
                    rows = list((await session.execute(query)).scalars())
                if filling and only is None:
                    # A fresh claim (nothing of the portal's in flight): events that wait
                    # to fill a batch go first once they should wait no longer.
                    rows = await self._filled_run(portal_id, now, rows, session=session) or rows
                if not rows:
                    return None
                spec = self.registry.lookup(rows[0].type)
                if only is not None and spec is not only:
                    return None
                run = [rows[0]]
                for row in rows[1:]:
                    if self.registry.lookup(row.type) is not spec:
                        break
                    run.append(row)
                if spec is None:
                    await self._set_aside_unhandled(run, now, session=session)
                    continue
                run = run[: spec.batch_size]
                ids = [row.id for row in run]
                await session.execute(
                    sa.update(InboxEvent)
                    .where(col(InboxEvent.id).in_(ids))
                    .values(
                        status=EventStatus.in_progress,
                        lease_owner=self.worker_id,
                        lease_expires_at=now + self.lease,
                        attempts=InboxEvent.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                for row in run:
                    row.attempts += 1
                return _Batch(portal_id, spec, run)

    def _erasures_due(self, portal_id: int) -> Select[InboxEvent]:
        """The portal's pending privacy deletions, read through their partial index."""
        # Inlined, not bound, and without run_after: a planner uses a partial index only
        # for a condition it can see implies the index's (ERASURES_DUE) before any value
        # is known, and SQLite prefers ix_events_due given a range on run_after.
        erasure = sa.bindparam("erasure", PRIVACY_DELETION, sa.String, literal_execute=True)
        pending = sa.bindparam(
            "pending", EventStatus.pending.value, sa.String, literal_execute=True
        )
        query = (
            sa.select(InboxEvent)
            .where(
                col(InboxEvent.portal_id) == portal_id,
                col(InboxEvent.type) == erasure,
                col(InboxEvent.status) == pending,
            )
            .order_by(col(InboxEvent.occurred_at), col(InboxEvent.id))
            .limit(MAX_FETCH)
        )
        return query.with_for_update(skip_locked=True) if self._postgres else query

    def _due(self, portal_id: int, now: datetime) -> Select[InboxEvent]:
        """The portal's due events, at most a fetch's worth, locked on PostgreSQL."""
        query = (
            sa.select(InboxEvent)
            .where(
                col(InboxEvent.portal_id) == portal_id,
                col(InboxEvent.status) == EventStatus.pending,
                col(InboxEvent.run_after) <= now,
            )
            .limit(MAX_FETCH)
        )
        return query.with_for_update(skip_locked=True) if self._postgres else query

    async def _filled_run(
        self, portal_id: int, now: datetime, others: list[InboxEvent], *, session: AsyncSession
    ) -> list[InboxEvent]:
        """Due events of a handler that fills its batches, if they should run now; else empty."""
        # They run when a whole batch of them is due, the oldest has waited long enough,
        # or nothing else of the portal's is due (`others`).
        query = self._due(portal_id, now).where(
            col(InboxEvent.type).in_(self.registry.filling_types)
        )
        rows = list(
            (
                await session.execute(
                    query.order_by(col(InboxEvent.received_at), col(InboxEvent.id))
                )
            ).scalars()
        )
        if not rows:
            return []
        spec = self.registry.lookup(rows[0].type)
        assert spec is not None
        assert spec.fill_wait is not None
        run = [row for row in rows if self.registry.lookup(row.type) is spec]
        if not others or len(run) >= spec.batch_size or run[0].received_at <= now - spec.fill_wait:
            return run
        return []

    async def _hold_portal(self, portal_id: int, *, session: AsyncSession) -> bool:
        """Renew our lease on the portal in the caller's transaction; False when we lost it."""
        # Claims and records check this themselves: the heartbeat notices a lost lease
        # only every third of a lease, and in between another worker may serve the portal.
        # Called before the events are locked, as the heartbeat locks leases before
        # events, so the two never wait on each other in opposite orders.
        now = utcnow()
        renewed = await session.execute(
            sa.update(PortalLease)
            .where(
                col(PortalLease.portal_id) == portal_id,
                col(PortalLease.owner) == self.worker_id,
                col(PortalLease.expires_at) > now,
            )
            .values(expires_at=now + self.lease)
            .returning(col(PortalLease.portal_id))
        )
        return renewed.scalar_one_or_none() is not None

    async def _confirm_lease(self, portal_id: int) -> None:
        """Renew our lease on the portal before a HubSpot write; LeaseLost if it may be lost."""
        # Renewed, the lease holds a full term from `started`: a write sent now is over (or
        # timed out) before another worker may take the portal. A renewal that took a
        # third of the term (a busy database, a stopped process) may not leave that
        # margin: it is renewed once more before giving up.
        for _ in range(2):
            started = time.monotonic()
            async with transaction(self.services.sessions) as session:
                if not await self._hold_portal(portal_id, session=session):
                    raise LeaseLost(f"lost the lease of portal {portal_id}")
            if time.monotonic() - started <= self.lease.total_seconds() / 3:
                return
        raise LeaseLost(f"the database renewed the lease of portal {portal_id} too slowly")

    async def _recover_abandoned(self, portal_id: int, *, session: AsyncSession) -> None:
        """Put back events a crashed worker left in progress; we hold the portal's lease now."""
        abandoned = sa.and_(
            col(InboxEvent.portal_id) == portal_id,
            col(InboxEvent.status) == EventStatus.in_progress,
        )
        # A crash counts as an attempt, so an event that kills its worker every time
        # ends failed instead of taking workers down forever.
        await session.execute(
            sa.update(InboxEvent)
            .where(abandoned, col(InboxEvent.attempts) >= self.retry_policy.max_attempts)
            .values(
                status=EventStatus.failed,
                last_error="the worker handling it stopped before finishing, every attempt",
                lease_owner=None,
                lease_expires_at=None,
                finished_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        await session.execute(
            sa.update(InboxEvent)
            .where(abandoned)
            .values(status=EventStatus.pending, lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )

    async def _set_aside_unhandled(
        self, run: list[InboxEvent], now: datetime, *, session: AsyncSession
    ) -> None:
        """Skip or put off events no handler here takes."""
        # HubSpot's are subscriptions Hubline does not use, and are skipped. Any other was
        # made or accepted by a newer Hubline than this worker (a rolling deploy, or a
        # rollback): it waits for a worker that knows its type, unlost.
        ignored = [row.id for row in run if row.source == SKIPPED_WHEN_UNHANDLED]
        newer = [row for row in run if row.source != SKIPPED_WHEN_UNHANDLED]
        if ignored:
            EVENTS_HANDLED.labels(outcome="skipped").inc(len(ignored))
            await session.execute(
                sa.update(InboxEvent)
                .where(col(InboxEvent.id).in_(ignored))
                .values(status=EventStatus.skipped, finished_at=now, last_error=None)
                .execution_options(synchronize_session=False)
            )
        if newer:
            types = sorted({row.type for row in newer})
            log.warning(
                "%d event(s) of a type this worker has no handler for (%s): left for a worker "
                "of the Hubline version that made them",
                len(newer),
                ", ".join(types),
            )
            await session.execute(
                sa.update(InboxEvent)
                .where(col(InboxEvent.id).in_([row.id for row in newer]))
                .values(
                    run_after=now + NEWER_TYPE_WAIT,
                    last_error="no handler for this type in this worker's Hubline version; "
                    "waiting for a worker that has one",
                )
                .execution_options(synchronize_session=False)
            )

    def _start(self, batch: _Batch) -> _Running:
        context = HandlerContext(self.services, batch.portal_id, self.worker_id)
        task = asyncio.create_task(self._run_batch(batch, context))
        return _Running(batch, context, task)

    async def _run_batch(self, batch: _Batch, context: HandlerContext) -> bool:
        """Run the handler and record its outcomes; False when the portal must not be served on."""
        # This task's own context (and its children's): other batches set their own.
        before_write.set(functools.partial(self._confirm_lease, batch.portal_id))
        cipher = self.services.cipher
        views: list[EventView] = []
        outcomes: dict[int, Outcome] = {}
        for row in batch.events:
            assert row.id is not None
            try:
                payload = read_payload(row, cipher)
            except CryptoError as error:
                outcomes[row.id] = error
                continue
            views.append(EventView.of(row, payload))
        try:
            if views:
                try:
                    outcomes.update(await batch.spec.handle(context, views) or {})
                except (asyncio.CancelledError, LeaseLost):
                    raise
                except Exception as error:
                    outcomes.update(await self._isolate(batch.spec, context, views, error))
        except asyncio.CancelledError:
            await asyncio.shield(self._release_batch(batch))
            raise
        except LeaseLost as lost:
            # Another worker may be serving these events now: nothing more of the batch
            # goes to HubSpot, and its outcomes are not ours to record. Those still ours
            # (the renewal only too slow) are given back without counting the attempt.
            log.warning("stopping a batch mid-way: %s", lost)
            await asyncio.shield(self._release_batch(batch))
            return False
        # The handler's work is done (HubSpot has it): a cancellation now (the grace period
        # over, a lost lease) waits for the record rather than drop it, or the events would
        # stay in progress and their work be done again.
        recording = asyncio.ensure_future(self._record_outcomes(batch, outcomes))
        try:
            return await asyncio.shield(recording)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await recording
            raise

    async def _isolate(
        self, spec: HandlerSpec, context: HandlerContext, views: list[EventView], error: Exception
    ) -> dict[int, Outcome]:
        """The outcomes of a batch whose handler raised `error`; the event at fault is found."""
        # The batch's halves are handled apart, and the failing half's again, so one event
        # whose data trips a bug fails alone instead of taking the batch's other events
        # with it. Handlers are safe to run again (a retry never duplicates). Not for the
        # failures a handler expects (HubSpot's answers, the network, the database): every
        # event is retried for those. When both halves fail, the cause is something they
        # share, and every event is retried too, so a fault of the whole batch costs two
        # more runs.
        if len(views) == 1 or isinstance(error, EXPECTED_FAILURES):
            return {view.id: error for view in views}
        # The portal's next batch waits for this one whole: a rerun writes contacts again.
        alone = replace(context, next_batch_may_start=asyncio.Event())
        middle = len(views) // 2
        halves: list[tuple[list[EventView], dict[int, Outcome] | Exception]] = []
        for half in (views[:middle], views[middle:]):
            try:
                halves.append((half, await spec.handle(alone, half) or {}))
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as half_error:
                halves.append((half, half_error))
        if all(isinstance(answer, Exception) for _, answer in halves):
            return {view.id: error for view in views}
        outcomes: dict[int, Outcome] = {}
        for half, answer in halves:
            if isinstance(answer, Exception):
                log.warning(
                    "a handler failed on %d of a batch's %d events (%s); finding the event",
                    len(half),
                    len(views),
                    describe_error(answer),
                )
                outcomes |= await self._isolate(spec, alone, half, answer)
            else:
                outcomes |= answer
        return outcomes

    async def _record_outcomes(self, batch: _Batch, outcomes: dict[int, Outcome]) -> bool:
        try:
            return await self._record(batch, outcomes)
        except LeaseLost:
            log.warning("lost the lease on a batch; another worker took it over")
            return False
        except Exception as error:
            # Not the traceback: a database error's text repeats the statement's parameters.
            log.error(
                "recording a batch's outcomes failed (%s); retrying its events",
                describe_error(error),
            )
            return await self._record_failure(batch, error)

    async def _record_failure(self, batch: _Batch, error: Exception) -> bool:
        """Record `error` as every event's outcome, after recording the real ones failed."""
        # Left in progress, the events would be put back by the next claim with no backoff
        # and their attempts would end with a generic error: the handler's side effects
        # repeat at once, and the reason is lost. A fresh transaction, since the failed
        # one may have left its connection unusable.
        try:
            return await self._record(
                batch, {row.id: error for row in batch.events if row.id is not None}
            )
        except Exception as again:
            # The database is unreachable, or the events are no longer ours: whoever
            # holds the portal next puts them back.
            log.error(
                "recording a batch's failure failed too (%s); its events wait for recovery",
                describe_error(again),
            )
            return False

    async def _record(self, batch: _Batch, outcomes: dict[int, Outcome]) -> bool:
        """Record the outcomes in one transaction; LeaseLost when the portal or events are lost."""
        now = utcnow()
        record = self._decide(batch, outcomes, now)
        ids = [row.id for row in batch.events]
        async with transaction(self.services.sessions) as session:
            if not await self._hold_portal(batch.portal_id, session=session):
                raise LeaseLost(f"portal {batch.portal_id}")
            portal_values = _portal_activity(record, now)
            if portal_values:
                # Before the events are locked, as the install locks the portal before them.
                await session.execute(
                    sa.update(Portal)
                    .where(col(Portal.portal_id) == batch.portal_id)
                    .values(portal_values)
                    .execution_options(synchronize_session=False)
                )
            if not record.keep_serving and await _portal_is_active(
                batch.portal_id, session=session
            ):
                # Reinstalled while this batch ran: the install un-parked what was parked
                # then, which these events were not yet (locked before them, as the install
                # locks it before un-parking). They are retried instead.
                record.keep_serving = True
                for decided in record.decided:
                    if decided.action is Action.park:
                        decided.action = Action.retry
                        decided.values |= self._retry_values(decided.row.attempts, now)
            # Still ours? The rows stay locked (PostgreSQL) or the database does (SQLite's
            # BEGIN IMMEDIATE) until commit, so the updates below cannot race a takeover.
            held = await session.execute(
                sa.select(col(InboxEvent.id))
                .where(
                    col(InboxEvent.id).in_(ids),
                    col(InboxEvent.lease_owner) == self.worker_id,
                    col(InboxEvent.status) == EventStatus.in_progress,
                )
                .with_for_update()
            )
            lost = set(ids) - set(held.scalars())
            if lost:
                raise LeaseLost(f"event {min(i for i in lost if i is not None)}")
            if record.done:
                # On the connection: the session would read a list of parameter sets as an
                # ORM bulk update by primary key.
                connection = await session.connection()
                await connection.execute(_MARK_DONE.values(finished_at=now), record.done)
            for decided in record.decided:
                await session.execute(
                    sa.update(InboxEvent)
                    .where(col(InboxEvent.id) == decided.row.id)
                    .values(**decided.values)
                    .execution_options(synchronize_session=False)
                )
            for write in record.writes:
                await write(session)
            if not record.keep_serving:
                await park_portal_events(batch.portal_id, session=session)
        _report(record)
        return record.keep_serving

    def _decide(self, batch: _Batch, outcomes: dict[int, Outcome], now: datetime) -> _Record:
        """What the record writes for each event: done, or the retry policy's decision."""
        record = _Record()
        for row in batch.events:
            assert row.id is not None
            # A test event the owner sent from the settings page says nothing of the
            # receptionist, nor is it a sync (nothing goes to HubSpot).
            calls_in = row.source == EventSource.receptionist and row.type != PING
            if calls_in and (
                record.newest_received is None or row.received_at > record.newest_received
            ):
                record.newest_received = row.received_at
            outcome = outcomes.get(row.id, Done())
            if isinstance(outcome, Done):
                record.done.append(
                    {
                        "b_id": row.id,
                        "b_result": json.dumps(outcome.result) if outcome.result else None,
                        "b_contact_id": outcome.contact_id,
                    }
                )
                if outcome.write is not None:
                    record.writes.setdefault(outcome.write)
                record.latencies.append((now - row.received_at).total_seconds())
                if calls_in:
                    record.synced_receptionist_events = True
                continue
            values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
            decision = self.retry_policy.decide(outcome, row.attempts)
            values["last_error"] = describe_error(outcome)
            if decision.action is Action.retry:
                values |= {
                    "status": EventStatus.pending,
                    "run_after": now + timedelta(seconds=decision.delay),
                }
            elif decision.action is Action.fail:
                values |= {"status": EventStatus.failed, "finished_at": now}
            else:
                # The portal cannot be served now: waiting is not an attempt.
                values |= {"status": EventStatus.parked, "attempts": row.attempts - 1}
                record.keep_serving = False
            record.decided.append(_Decided(row, outcome, decision.action, values))
        return record

    def _retry_values(self, attempts: int, now: datetime) -> dict[str, Any]:
        # Counted as an attempt and backed off: should the portal still be unusable
        # while it reads as active, its events must not cycle without pause.
        delay = self.retry_policy.ceiling(attempts)
        return {
            "status": EventStatus.pending,
            "attempts": attempts,
            "run_after": now + timedelta(seconds=delay),
        }

    async def _release_batch(self, batch: _Batch) -> None:
        """Give back a batch we stopped in the middle of; its attempt does not count."""
        # The handler may have been stopped after HubSpot made a contact and before its id
        # was written down: the events wait as long as after a write whose answer was
        # lost, so that HubSpot's search shows such a contact to the next attempt.
        ids = [row.id for row in batch.events]
        run_after = utcnow() + timedelta(seconds=self.retry_policy.ambiguous_write_min_delay)
        with contextlib.suppress(Exception):
            async with transaction(self.services.sessions) as session:
                await session.execute(
                    sa.update(InboxEvent)
                    .where(
                        col(InboxEvent.id).in_(ids),
                        col(InboxEvent.lease_owner) == self.worker_id,
                        col(InboxEvent.status) == EventStatus.in_progress,
                    )
                    .values(
                        status=EventStatus.pending,
                        run_after=run_after,
                        lease_owner=None,
                        lease_expires_at=None,
                        attempts=InboxEvent.attempts - 1,
                    )
                    .execution_options(synchronize_session=False)
                )
            log.info("released %d in-flight events", len(ids))

    # --- leases, periodic jobs, bookkeeping ------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.lease.total_seconds() / 3
        renewing = _FailureLog("renewing leases")
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew_leases()
            except Exception as error:
                renewing.failed(error)
            else:
                renewing.succeeded()

    async def _renew_leases(self) -> None:
        # Taken before the awaits below: meanwhile a task may end and leave `_active`, or
        # be replaced by a new one for the same portal, holding a lease just taken.
        tasks = {p: task for p, task in self._active.items() if not task.done()}
        portals = list(tasks)
        if not portals:
            return
        expires = utcnow() + self.lease
        async with transaction(self.services.sessions) as session:
            renewed = await session.execute(
                sa.update(PortalLease)
                .where(
                    col(PortalLease.portal_id).in_(portals),
                    col(PortalLease.owner) == self.worker_id,
                )
                .values(expires_at=expires)
                .returning(col(PortalLease.portal_id))
            )
            kept = set(renewed.scalars())
            await session.execute(
                sa.update(InboxEvent)
                .where(
                    col(InboxEvent.lease_owner) == self.worker_id,
                    col(InboxEvent.status) == EventStatus.in_progress,
                )
                .values(lease_expires_at=expires)
                .execution_options(synchronize_session=False)
            )
        for portal_id in set(portals) - kept:
            # Someone took the portal over while we could not renew: stop serving it.
            log.warning(
                "lost the lease of a portal; stopping its work", extra={"lost_portal": portal_id}
            )
            if self._active.get(portal_id) is tasks[portal_id]:
                tasks[portal_id].cancel()

    async def _periodic_loop(self) -> None:
        while True:
            for job in self._periodic:
                if time.monotonic() >= job.next_run:
                    job.next_run = time.monotonic() + job.every_seconds
                    try:
                        if await self._acquire_singleton(job.name, job.every_seconds):
                            await job.job(self.services)
                    except Exception as error:
                        job.failure_log.failed(error)
                    else:
                        job.failure_log.succeeded()
            await asyncio.sleep(min(1.0, self.poll_seconds * 2))

    async def _acquire_singleton(self, name: str, hold_seconds: float) -> bool:
        """Take the app-wide lease `name` if free or expired, for `hold_seconds`."""
        now = utcnow()
        insert = pg_insert if self._postgres else sqlite_insert
        expires = now + timedelta(seconds=hold_seconds)
        statement = (
            insert(Lease)
            .values(name=name, owner=self.worker_id, expires_at=expires)
            .on_conflict_do_update(
                index_elements=["name"],
                set_={"owner": self.worker_id, "expires_at": expires},
                where=sa.or_(col(Lease.expires_at).is_(None), col(Lease.expires_at) <= now),
            )
            .returning(col(Lease.name))
        )
        async with transaction(self.services.sessions) as session:
            return (await session.execute(statement)).scalar_one_or_none() is not None

    async def _has_unfinished_events(self) -> bool:
        # Not counting what waits for a newer worker: this one will never finish it.
        for_newer_worker = sa.and_(
            col(InboxEvent.status) == EventStatus.pending,
            col(InboxEvent.source) != SKIPPED_WHEN_UNHANDLED,
            col(InboxEvent.type).not_in(self.registry.types),
        )
        query = sa.select(col(InboxEvent.id)).where(
            col(InboxEvent.status).in_([EventStatus.pending, EventStatus.in_progress]),
            sa.not_(for_newer_worker),
        )
        async with self.services.sessions() as session:
            return (await session.execute(query.limit(1))).first() is not None


def build_worker(services: Services, **options: Any) -> Worker:
    """A worker with Hubline's periodic jobs: journal polling, scope checks, daily provisioning."""
    from app import lifecycle, properties

    worker = Worker(services, **options)
    lifecycle.add_periodic_jobs(worker, services.settings)
    properties.register_periodic(worker)
    return worker


def _portal_activity(record: _Record, now: datetime) -> dict[str, Any]:
    """What a batch's record says on its portal: its last sync, its newest event."""
    values: dict[str, Any] = {}
    if record.synced_receptionist_events:
        values["last_synced_at"] = now
    if record.newest_received is not None:
        # Never back: a retried older event may be recorded after a newer one.
        newest = sa.literal(record.newest_received, UTCDateTime())
        last = col(Portal.last_event_at)
        values["last_event_at"] = sa.case(
            (sa.or_(last.is_(None), last < newest), newest), else_=last
        )
    return values


async def _portal_is_active(portal_id: int, *, session: AsyncSession) -> bool:
    # Locked (PostgreSQL; SQLite's BEGIN IMMEDIATE holds the database) until commit, so
    # a reinstall either committed before this read or un-parks after this commit.
    status = await session.scalar(
        sa.select(col(Portal.status)).where(col(Portal.portal_id) == portal_id).with_for_update()
    )
    return status == PortalStatus.active


def _report(record: _Record) -> None:
    """Log and count a batch's recorded outcomes, with the action each record took."""
    # Once recorded: a park can turn into a retry in the record.
    for decided in record.decided:
        log.warning(
            "event %s %s: %s",
            decided.row.id,
            decided.action,
            decided.values["last_error"],
            extra={
                "event_type": decided.row.type,
                "attempt": decided.row.attempts,
                **hubspot_error_fields(decided.error),
            },
        )
        EVENTS_HANDLED.labels(outcome=str(decided.action)).inc()
    for latency in record.latencies:
        EVENTS_HANDLED.labels(outcome="done").inc()
        RECEIPT_TO_SYNCED.observe(latency)


def describe_error(error: BaseException) -> str:
    """The error as an operator reads it, with anything that looks like a secret or PII removed."""
    text = str(error) or type(error).__name__
    if isinstance(error, sa.exc.StatementError) and error.orig is not None:
        # Its own text repeats the statement's parameters, which may hold a caller's
        # name (a failed Done.write's row): keep only what the database said.
        text = str(error.orig) or type(error.orig).__name__
    if not isinstance(error, HublineError):
        # Our own errors say what went wrong; anyone else's is named by its type.
        text = f"{type(error).__name__}: {text}"
    return redact_text(text)[:MAX_ERROR_LENGTH]


async def _retention(services: Services) -> None:
    """Delete what outlived its retention: payloads, parked events, OAuth states, index entries."""
    settings = services.settings
    payloads = await purge_expired_payloads(
        services.sessions, retention=timedelta(days=settings.event_retention_days)
    )
    async with transaction(services.sessions) as session:
        parked = await purge_expired_parked(
            session=session, retention=timedelta(days=settings.parked_retention_days)
        )
        await session.execute(
            sa.delete(OAuthState)
            .where(col(OAuthState.expires_at) < utcnow())
            .execution_options(synchronize_session=False)
        )
        # Deleted contacts' index entries are kept a while so a late privacy deletion
        # can still find their callers; after the retention period they go too.
        await identity.purge_removed(
            session=session, before=utcnow() - timedelta(days=settings.event_retention_days)
        )
        await identity.purge_uninstalled(
            session=session, before=utcnow() - timedelta(days=settings.parked_retention_days)
        )
    if payloads or parked:
        log.info("retention: deleted %d payloads and %d parked events", payloads, parked)
