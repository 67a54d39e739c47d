"""What a run ends with: each sent event traced to its inbox row and its sandbox engagement.

An event is lost when it was acknowledged (a 2xx) and yet has no engagement in the
sandbox and is not a visible failed event. Duplicates are counted in the sandbox
itself: two contacts with one phone, or two engagements carrying one event's id.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from app import db
from app.crypto import TokenCipher
from app.inbox import NewEvent, idempotency_hashes
from app.models import EventSource, EventStatus, InboxEvent, utcnow
from reliability.stack import Stack
from reliability.traffic import EVENT_MARK, PlannedEvent

EVENT_ID_RE = re.compile(re.escape(EVENT_MARK) + r" ([A-Za-z0-9_-]+)")
UNFINISHED = (EventStatus.pending, EventStatus.in_progress)


@dataclass
class Accounting:
    sent_events: int = 0
    acknowledged: int = 0
    synced: int = 0
    failed_visible: int = 0
    parked: int = 0
    lost: int = 0
    unfinished: int = 0
    duplicate_contacts: int = 0
    duplicate_engagements: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lost_examples: list[str] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def event_hash(cipher: TokenCipher, event: PlannedEvent) -> str:
    new = NewEvent(event.portal_id, EventSource.receptionist, event.type, event.event_id, utcnow())
    return idempotency_hashes(cipher, new)[0]


async def inbox_rows(database_url: str) -> list[InboxEvent]:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with db.session_factory(engine)() as session:
            return list((await session.execute(sa.select(InboxEvent))).scalars())
    finally:
        await engine.dispose()


async def unfinished_count(database_url: str, *, source: str | None = None) -> int:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    query = sa.select(sa.func.count()).where(col(InboxEvent.status).in_(UNFINISHED))
    if source is not None:
        query = query.where(col(InboxEvent.source) == source)
    try:
        async with engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())
    finally:
        await engine.dispose()


def _digits(phone: str) -> str:
    return re.sub(r"\D", "", phone)[-10:]


async def sandbox_engagements(stack: Stack, portal_id: int) -> tuple[Counter[str], int]:
    """(engagements per event id, duplicate contacts) in one sandbox portal."""
    detail = await stack.sandbox_get(f"/_sandbox/portals/{portal_id}")
    per_event: Counter[str] = Counter()
    for kind, body_field in (("calls", "hs_call_body"), ("notes", "hs_note_body")):
        for record in detail["objects"].get(kind, []):
            if record["archived"]:
                continue
            match = EVENT_ID_RE.search(record["properties"].get(body_field) or "")
            if match:
                per_event[match.group(1)] += 1
    phones: Counter[str] = Counter()
    emails: Counter[str] = Counter()
    for record in detail["objects"].get("contacts", []):
        if record["archived"]:
            continue
        properties = record["properties"]
        if properties.get("phone"):
            phones[_digits(properties["phone"])] += 1
        if properties.get("email"):
            emails[properties["email"].lower()] += 1
    duplicates = max(
        sum(n - 1 for n in phones.values() if n > 1), sum(n - 1 for n in emails.values() if n > 1)
    )
    return per_event, duplicates


async def account(stack: Stack, planned: list[PlannedEvent], acknowledged: set[str]) -> Accounting:
    """Trace every planned event; `acknowledged` holds the ids that got a 2xx."""
    cipher = TokenCipher.from_setting(stack.key)
    rows = {
        (row.portal_id, row.idempotency_hash): row
        for row in await inbox_rows(stack.database_url)
        if row.source == EventSource.receptionist
    }
    result = Accounting(sent_events=len(planned), acknowledged=len(acknowledged))
    engagements: Counter[str] = Counter()
    for portal_id in sorted({event.portal_id for event in planned}):
        per_event, duplicate_contacts = await sandbox_engagements(stack, portal_id)
        engagements.update(per_event)
        result.duplicate_contacts += duplicate_contacts
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for event in planned:
        row = rows.get((event.portal_id, event_hash(cipher, event)))
        status = row.status if row is not None else "not stored"
        statuses[status] += 1
        made = engagements.get(event.event_id, 0)
        result.duplicate_engagements += max(0, made - 1)
        if made:
            result.synced += 1
        elif status == EventStatus.failed:
            result.failed_visible += 1
            reasons[(row.last_error or "")[:80] if row else ""] += 1
        elif status == EventStatus.parked:
            result.parked += 1
        elif status in UNFINISHED:
            result.unfinished += 1
        elif event.event_id in acknowledged:
            result.lost += 1
            if len(result.lost_examples) < 5:
                result.lost_examples.append(f"{event.event_id} ({status})")
    result.statuses = dict(statuses)
    result.failure_reasons = dict(reasons.most_common(5))
    return result
