"""The durable inbox: every input becomes a row here, in the transaction that acknowledges it.

Enqueueing takes the caller's session and never commits. An event is identified per
portal and source by an idempotency key, stored as a keyed hash (a HubSpot
property-change key can hold a caller's phone); enqueueing a key already stored is a
no-op that says so. Payloads are encrypted, bound to their portal and event.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import TokenCipher
from app.db import UNREACHABLE, SessionFactory, rowcount, transaction
from app.models import PRIVACY_DELETION, EventSource, EventStatus, InboxEvent, utcnow
from app.vault import payload_context

if TYPE_CHECKING:
    from app.main import Services


@dataclass(frozen=True)
class NewEvent:
    """An event to store: where it came from, its identity, and its (plaintext) payload."""

    portal_id: int
    source: EventSource
    type: str
    idempotency_key: str
    occurred_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Enqueued:
    event_id: int
    created: bool  # False: an event with this key was already stored


def idempotency_hashes(cipher: TokenCipher, event: NewEvent) -> list[str]:
    """The event's key hashed under every configured key (the first is what gets stored)."""
    return cipher.blind_indexes(
        "event", f"{event.source}\x00{event.idempotency_key}", event.portal_id
    )


async def enqueue(
    event: NewEvent,
    *,
    session: AsyncSession,
    cipher: TokenCipher,
    status: EventStatus = EventStatus.pending,
) -> Enqueued:
    """Store one event in the caller's transaction unless its key is already stored."""
    [enqueued] = await enqueue_many([event], session=session, cipher=cipher, statuses=[status])
    return enqueued


async def enqueue_many(
    events: Sequence[NewEvent],
    *,
    session: AsyncSession,
    cipher: TokenCipher,
    statuses: Sequence[EventStatus] | None = None,
) -> list[Enqueued]:
    """Store events in the caller's transaction with one INSERT; answers in the given order.

    An event whose key is already stored, or that repeats an earlier event of `events`,
    is not stored again: its answer names the stored event.
    """
    if statuses is None:
        statuses = [EventStatus.pending] * len(events)
    if len(statuses) != len(events):
        raise ValueError("one status per event")
    hashes = [idempotency_hashes(cipher, event) for event in events]
    answers: list[Enqueued | None] = [None] * len(events)
    # During key rotation a stored key may be hashed under an older key, which the unique
    # index cannot see; with one key, the index and ON CONFLICT alone dedupe.
    rotating = [position for position, found in enumerate(hashes) if len(found) > 1]
    for position, existing in (await _find(session, events, hashes, rotating)).items():
        answers[position] = Enqueued(existing, created=False)
    now = utcnow()
    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    for position, event in enumerate(events):
        key = _row_key(event, hashes[position][0])
        if answers[position] is not None or key in rows:
            continue
        rows[key] = {
            "portal_id": event.portal_id,
            "source": str(event.source),
            "type": event.type,
            "idempotency_hash": key[2],
            "occurred_at": event.occurred_at,
            "received_at": now,
            "payload_ct": cipher.encrypt(
                json.dumps(event.payload, separators=(",", ":")),
                context=payload_context(event.portal_id, key[2]),
            ),
            "key_id": cipher.primary_key_id,
            "status": str(statuses[position]),
            "attempts": 0,
            "run_after": now,
        }
    inserted: dict[tuple[int, str, str], int] = {}
    if rows:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        # On the table, not the ORM class: a Core insert skips the ORM's bulk-insert machinery.
        table: sa.Table = InboxEvent.__table__  # type: ignore[attr-defined]
        statement = (
            insert(table)
            .on_conflict_do_nothing(index_elements=["portal_id", "source", "idempotency_hash"])
            .returning(table.c.id, table.c.portal_id, table.c.source, table.c.idempotency_hash)
        )
        # Many parameter sets for one cached statement: SQLAlchemy sends them as one
        # multi-row INSERT ("insertmanyvalues"). In key order, so two transactions storing
        # overlapping events take the unique index's locks in the same order.
        stored = await session.execute(statement, [rows[key] for key in sorted(rows)])
        for row in stored:
            inserted[(row.portal_id, row.source, row.idempotency_hash)] = row.id
    answered: set[tuple[int, str, str]] = set()
    conflicted: list[int] = []
    for position, event in enumerate(events):
        if answers[position] is not None:
            continue
        key = _row_key(event, hashes[position][0])
        if key in inserted:
            # The first event with this key is the one stored; a repeat names it.
            answers[position] = Enqueued(inserted[key], created=key not in answered)
            answered.add(key)
        else:
            conflicted.append(position)
    # Stored before (a sender's retry) or by a concurrent transaction PostgreSQL waited for:
    # one query names them all, so a storm of retries costs what the same new events do.
    stored_before = await _find(session, events, hashes, conflicted)
    for position in conflicted:
        assert position in stored_before, "conflicting insert left no row"
        answers[position] = Enqueued(stored_before[position], created=False)
    return [answer for answer in answers if answer is not None]


def _row_key(event: NewEvent, idempotency_hash: str) -> tuple[int, str, str]:
    return (event.portal_id, str(event.source), idempotency_hash)


# Below SQLite's limit on the parts of one compound SELECT (500).
_LOOKUPS_PER_QUERY = 100


async def _find(
    session: AsyncSession,
    events: Sequence[NewEvent],
    hashes: Sequence[list[str]],
    positions: Sequence[int],
) -> dict[int, int]:
    """The stored rows of these events (by position in `events`): one query per hundred."""
    if not positions:
        return {}
    wanted: dict[tuple[int, str, str], list[int]] = defaultdict(list)
    for position in positions:
        for value in hashes[position]:
            wanted[_row_key(events[position], value)].append(position)
    found: dict[int, int] = {}
    keys = list(wanted)
    for start in range(0, len(keys), _LOOKUPS_PER_QUERY):
        # One equality lookup per key, joined by UNION ALL: each is an exact probe of the
        # unique index whatever the planner knows (over a table not analyzed yet,
        # PostgreSQL reads an IN list row by row through every event of the portal).
        lookups = [
            sa.select(
                col(InboxEvent.id),
                col(InboxEvent.portal_id),
                col(InboxEvent.source),
                col(InboxEvent.idempotency_hash),
            ).where(
                col(InboxEvent.portal_id) == portal_id,
                col(InboxEvent.source) == source,
                col(InboxEvent.idempotency_hash) == value,
            )
            for portal_id, source, value in keys[start : start + _LOOKUPS_PER_QUERY]
        ]
        query = lookups[0] if len(lookups) == 1 else sa.union_all(*lookups)
        for row in await session.execute(query):
            for position in wanted.get((row.portal_id, row.source, row.idempotency_hash), ()):
                found[position] = row.id
    return found


# Enough to take a burst of concurrent webhooks in one commit, few enough that one
# INSERT stays small (its parameters stay far below the drivers' limits).
MAX_GROUP_COMMIT = 200


@dataclass
class _Waiting:
    event: NewEvent
    status: EventStatus
    answer: asyncio.Future[Enqueued]


class InboxWriter:
    """Group commit for webhook intake: events arriving together are stored in one transaction.

    A request waits for the commit that stores its event, so an answer still means stored
    durably; but while one transaction commits, the events that arrive queue up and go
    into the next one, so a burst costs a few commits instead of one per event. One
    writer runs per process, which on SQLite also keeps intake from queueing in SQLite's
    busy handler, whose backoff sleeps leave the write lock idle under load.
    """

    def __init__(self, sessions: SessionFactory, cipher: TokenCipher) -> None:
        self._sessions = sessions
        self._cipher = cipher
        self._queue: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0  # transactions that stored a group (read by tests)

    async def store(
        self, event: NewEvent, *, status: EventStatus = EventStatus.pending
    ) -> Enqueued:
        """Store `event` (unless its key is stored already) and answer once it is committed."""
        answer: asyncio.Future[Enqueued] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(event, status, answer))
        if self._writer is None or self._writer.done():
            # A context of its own: it writes every portal's events, and the request that
            # happened to start it would lend its request id and portal id to its logs.
            self._writer = asyncio.create_task(self._write_queued(), context=contextvars.Context())
        return await answer

    async def _write_queued(self) -> None:
        group: list[_Waiting] = []
        try:
            while self._queue:
                group = self._queue[:MAX_GROUP_COMMIT]
                del self._queue[: len(group)]
                await self._write(group)
                group = []
        finally:
            # Stopped (the process is shutting down): nothing queued was stored, say so.
            for waiting in group + self._queue:
                _settle(waiting, error=ConnectionError("intake stopped before storing the event"))
            self._queue.clear()

    async def _write(self, group: list[_Waiting]) -> None:
        try:
            async with transaction(self._sessions) as session:
                answers = await enqueue_many(
                    [waiting.event for waiting in group],
                    session=session,
                    cipher=self._cipher,
                    statuses=[waiting.status for waiting in group],
                )
        except Exception as error:
            if len(group) > 1 and not isinstance(error, UNREACHABLE):
                # One event the database refuses must not fail the others: each alone
                # (not when the database cannot be used at all: each would fail too).
                for waiting in group:
                    await self._write([waiting])
                return
            for waiting in group:
                _settle(waiting, error=error)
            return
        self.commits += 1
        for waiting, answer in zip(group, answers, strict=True):
            _settle(waiting, answer=answer)


def _settle(
    waiting: _Waiting, *, answer: Enqueued | None = None, error: BaseException | None = None
) -> None:
    # A request that went away (its client disconnected) cancelled its future.
    if waiting.answer.done():
        return
    if error is not None:
        waiting.answer.set_exception(error)
    else:
        waiting.answer.set_result(cast(Enqueued, answer))


def read_payload(event: InboxEvent, cipher: TokenCipher) -> dict[str, Any]:
    """The decrypted payload, or {} once retention has deleted it."""
    if event.payload_ct is None:
        return {}
    plain = cipher.decrypt(
        event.payload_ct, context=payload_context(event.portal_id, event.idempotency_hash)
    )
    result: dict[str, Any] = json.loads(plain)
    return result


async def park_portal_events(portal_id: int, *, session: AsyncSession) -> int:
    """Park a portal's pending events (it cannot be served now); returns how many.

    Uninstall signals (from Hubline or the app journal) are never parked: an uninstall
    must be handled precisely when the portal cannot be served. Nor are privacy
    deletions, which need no HubSpot call: parked, an erasure would wait on a re-consent
    that may never come, and then be deleted with the parked events, unapplied.
    """
    result = await session.execute(
        sa.update(InboxEvent)
        .where(
            col(InboxEvent.portal_id) == portal_id,
            col(InboxEvent.status) == EventStatus.pending,
            col(InboxEvent.source).not_in([EventSource.lifecycle, EventSource.journal]),
            col(InboxEvent.type) != PRIVACY_DELETION,
        )
        .values(status=EventStatus.parked)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


async def unpark_portal_events(portal_id: int, *, session: AsyncSession) -> int:
    """Resume a portal's parked events; returns how many."""
    result = await session.execute(
        sa.update(InboxEvent)
        .where(
            col(InboxEvent.portal_id) == portal_id,
            col(InboxEvent.status) == EventStatus.parked,
        )
        .values(
            status=EventStatus.pending, run_after=utcnow(), lease_owner=None, lease_expires_at=None
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


async def retry_events(
    *, session: AsyncSession, event_ids: list[int] | None = None, portal_id: int | None = None
) -> int:
    """Put failed events (these ids, or all of a portal's, or all) back to pending."""
    query = sa.update(InboxEvent).where(col(InboxEvent.status) == EventStatus.failed)
    if event_ids is not None:
        query = query.where(col(InboxEvent.id).in_(event_ids))
    if portal_id is not None:
        query = query.where(col(InboxEvent.portal_id) == portal_id)
    result = await session.execute(
        query.values(
            status=EventStatus.pending, attempts=0, run_after=utcnow(), finished_at=None
        ).execution_options(synchronize_session=False)
    )
    return rowcount(result)


# Few enough that each transaction holds SQLite's write lock (which intake waits behind)
# for milliseconds, enough that a busy day's expiry takes few transactions.
PURGE_CHUNK = 1000


def expired_payloads(before: datetime, limit: int) -> sa.Select[int | None, str]:
    """Up to `limit` events finished before `before` that still hold a payload, with their
    status.

    Read through ix_events_payload_expiry, which holds only finished events with a
    payload: the cost follows what expires, not every event ever handled.
    """
    return (
        sa.select(col(InboxEvent.id), col(InboxEvent.status))
        .where(
            # The index's own condition, spelled out for the planner, then its range.
            col(InboxEvent.payload_ct).is_not(None),
            col(InboxEvent.finished_at).is_not(None),
            col(InboxEvent.finished_at) < before,
        )
        .limit(limit)
    )


# Failed is final too: an operator had the retention period to retry it.
_FINAL = frozenset({EventStatus.done, EventStatus.skipped, EventStatus.failed})


async def purge_expired_payloads(
    sessions: SessionFactory, *, retention: timedelta, chunk: int = PURGE_CHUNK
) -> int:
    """Delete the payloads of events finished more than `retention` ago, a chunk per
    transaction; returns how many."""
    before = utcnow() - retention
    purged = 0
    while True:
        async with transaction(sessions) as session:
            found = (await session.execute(expired_payloads(before, chunk))).all()
            # Picked here, not in the UPDATE: given a status condition, SQLite's planner
            # reads the status index (every done event) instead of the ids.
            ids = [row.id for row in found if row.status in _FINAL]
            done = 0
            if ids:
                result = await session.execute(
                    sa.update(InboxEvent)
                    .where(
                        col(InboxEvent.id).in_(ids),
                        # Still finished: an operator's retry (which clears it) may have
                        # committed since the read, and keeps its payload.
                        col(InboxEvent.finished_at).is_not(None),
                    )
                    .values(payload_ct=None, key_id=None)
                    .execution_options(synchronize_session=False)
                )
                done = rowcount(result)
        purged += done
        if len(found) < chunk or not ids:
            # No final event in a full chunk (finished events all are): left alone rather
            # than read again forever.
            return purged


async def purge_expired_parked(*, session: AsyncSession, retention: timedelta) -> int:
    """Delete parked events received more than `retention` ago; returns how many."""
    parked = await session.execute(
        sa.delete(InboxEvent)
        .where(
            col(InboxEvent.status) == EventStatus.parked,
            col(InboxEvent.received_at) < utcnow() - retention,
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(parked)


async def newest_of_portal(
    session: AsyncSession,
    portal_id: int,
    *,
    limit: int,
    source: str = "",
    statuses: Sequence[EventStatus] = tuple(EventStatus),
) -> list[InboxEvent]:
    """A portal's newest events by when they happened (then by id), newest first.

    One probe of ix_events_portal_due per status, each reading at most `limit` entries,
    merged in one statement (one snapshot: an event changing status meanwhile is seen
    once): the newest overall are among each status's newest, and the cost does not grow
    with the portal's history, where ordering by id read every row of the table newer
    than the portal's oldest shown (PostgreSQL) or sorted the portal's whole history
    (SQLite): seconds for a quiet or a large portal.
    """
    probes = []
    for status in statuses:
        probe = (
            sa.select(col(InboxEvent.id), col(InboxEvent.occurred_at))
            .where(col(InboxEvent.portal_id) == portal_id, col(InboxEvent.status) == status)
            .order_by(col(InboxEvent.occurred_at).desc(), col(InboxEvent.id).desc())
            .limit(limit)
        )
        if source:
            probe = probe.where(col(InboxEvent.source) == source)
        # A subquery each: SQLite takes ORDER BY and LIMIT only on a whole compound select.
        probes.append(sa.select(probe.subquery()))
    found = (await session.execute(sa.union_all(*probes))).all()
    newest = sorted(found, key=lambda row: (row.occurred_at, row.id), reverse=True)
    ids = [row.id for row in newest[:limit]]
    rows = await session.execute(sa.select(InboxEvent).where(col(InboxEvent.id).in_(ids)))
    by_id = {event.id: event for event in rows.scalars()}
    return [by_id[event_id] for event_id in ids if event_id in by_id]


# --- handlers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EventView:
    """What a handler sees of one event: its identity and its decrypted payload."""

    id: int
    portal_id: int
    source: str
    type: str
    occurred_at: datetime
    received_at: datetime
    attempts: int
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: InboxEvent, payload: dict[str, Any]) -> EventView:
        assert row.id is not None
        return cls(
            id=row.id,
            portal_id=row.portal_id,
            source=row.source,
            type=row.type,
            occurred_at=row.occurred_at,
            received_at=row.received_at,
            attempts=row.attempts,
            payload=payload,
        )


@dataclass
class HandlerContext:
    """What a handler may use: the shared services and the worker serving this portal."""

    services: Services
    portal_id: int
    worker_id: str
    # Set by `let_next_batch_start`; the worker waits on it (or on the batch's end).
    next_batch_may_start: asyncio.Event = field(default_factory=asyncio.Event)

    def let_next_batch_start(self) -> None:
        """Say that the rest of this batch no longer bears on the portal's next events.

        The worker then starts the portal's next batch, if the same handler takes it,
        alongside the rest of this one: its HubSpot round trips overlap this batch's
        last ones instead of waiting for them. At most two batches of a portal run at once.
        """
        self.next_batch_may_start.set()


Write = Callable[[AsyncSession], Awaitable[None]]


@dataclass
class Done:
    """A handled event. `write` runs in the transaction that marks it done."""

    result: dict[str, Any] | None = None
    contact_id: str | None = None
    write: Write | None = None


# A handler returns an outcome per event id (events it leaves out are Done), or raises.
# Raising one of the failures handlers expect (HubSpot's answers, the network, the
# database) has the same retry decision applied to the whole batch; any other error has
# the batch run again in halves, so the event at fault fails alone (worker._isolate).
# An exception as an outcome fails or retries that event alone.
Outcome = Done | BaseException
Handler = Callable[[HandlerContext, list[EventView]], Awaitable[dict[int, Outcome] | None]]


@dataclass(frozen=True)
class HandlerSpec:
    types: frozenset[str]
    handle: Handler
    batch_size: int
    fill_wait: timedelta | None = None  # see `Registry.handler`


class Registry:
    """Maps event types to handlers; modules register theirs with `@registry.handler(...)`."""

    def __init__(self) -> None:
        self._by_type: dict[str, HandlerSpec] = {}

    def handler(
        self, *types: str, batch_size: int = 1, fill_wait: timedelta | None = None
    ) -> Callable[[Handler], Handler]:
        """Register a handler for `types`, given up to `batch_size` events at a time.

        With `fill_wait`, the handler's events wait to fill a batch: they are claimed once
        `batch_size` of them are due, once the oldest has waited `fill_wait`, or once the
        portal has nothing else due; until then the portal's other events are claimed past
        them. For work HubSpot takes a hundred records a request that may land a little
        later, where each request counts against the portal's budget.
        """
        if not 1 <= batch_size <= 100:
            raise ValueError("batch_size must be between 1 and 100")

        def register(handle: Handler) -> Handler:
            spec = HandlerSpec(frozenset(types), handle, batch_size, fill_wait)
            for event_type in types:
                if event_type in self._by_type:
                    raise ValueError(f"a handler for {event_type!r} is already registered")
                self._by_type[event_type] = spec
            return handle

        return register

    def lookup(self, event_type: str) -> HandlerSpec | None:
        """The handler of this event type; None when no module declared one."""
        return self._by_type.get(event_type)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self._by_type)

    @property
    def filling_types(self) -> frozenset[str]:
        """Types whose handlers wait to fill a batch (`fill_wait`)."""
        return frozenset(t for t, spec in self._by_type.items() if spec.fill_wait is not None)


registry = Registry()

# Modules that declare handlers on `registry`; the worker imports them all.
HANDLER_MODULES: list[str] = ["app.contacts", "app.lifecycle", "app.sync", "app.properties"]


def load_handlers() -> Registry:
    """The registry, once every module that declares handlers on it is imported."""
    import importlib

    for module in HANDLER_MODULES:
        importlib.import_module(module)
    return registry
