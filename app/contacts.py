"""Handlers for HubSpot's contact webhooks: they keep the identity index in step with the CRM.

- `contact.creation`, `contact.restore` and changes of `phone` or `mobilephone` read the
  contact (one batch read per batch of events) and make its current phones and email its
  index entries. A phone change must read: the event carries the new value only, and
  which of the contact's indexed phones it replaced is not in it.
- A change of `email` that carries the value is applied as is, unless the index already
  holds something newer for that contact (events arrive late and out of order).
- `contact.merge` points the merged contacts' entries (and events) at the survivor.
- `contact.deletion` takes the contact out of lookups.
- `contact.privacyDeletion` erases the contact: its index entries, and every caller
  detail Hubline stored about it (the payloads of its events and of pending events from
  the same caller). It may arrive before or after the matching `contact.deletion`.

One handler serves all of them, so a run of contact events is handled in the order
HubSpot says they happened; each event's index writes run in the transaction that marks
it done (`Done.write`), in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app import identity
from app.crypto import TokenCipher
from app.db import rowcount
from app.errors import CryptoError, HubSpotError, PermanentError
from app.hubspot import hubspot_client
from app.inbox import Done, EventView, HandlerContext, Outcome, Write, read_payload, registry
from app.models import PRIVACY_DELETION, EventSource, EventStatus, InboxEvent, utcnow
from app.portals import get_portal

log = logging.getLogger(__name__)

CONTACT_EVENT_TYPES = (
    "contact.creation",
    "contact.restore",
    "contact.propertyChange",
    "contact.merge",
    "contact.deletion",
    PRIVACY_DELETION,
)
INDEXED_PROPERTIES = {
    "phone": identity.PHONE,
    "mobilephone": identity.PHONE,
    "email": identity.EMAIL,
}
READ_PROPERTIES = ["phone", "mobilephone", "email"]
BATCH_READ_PATH = "/crm/v3/objects/contacts/batch/read"
BATCH_READ_LIMIT = 100


@dataclass(frozen=True)
class ContactChange:
    """What one contact event says, taken from its HubSpot payload."""

    event_id: int
    type: str
    contact_id: str
    occurred_at: datetime
    property_name: str | None = None
    property_value: str | None = None  # None when the event does not carry the value
    merged_ids: tuple[str, ...] = ()

    @property
    def needs_read(self) -> bool:
        if self.type in ("contact.creation", "contact.restore"):
            return True
        if self.type != "contact.propertyChange" or self.property_name not in INDEXED_PROPERTIES:
            return False
        return self.property_name != "email" or self.property_value is None


def _id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    return text if text.isdigit() and len(text) <= 32 else None


def _ids(value: Any) -> list[Any]:
    """A list of ids as given; anything else (HubSpot sends a list) names none."""
    return value if isinstance(value, list) else []


def parse_change(view: EventView) -> ContactChange | None:
    """The change an event describes; None when its payload is not a usable contact event."""
    payload = view.payload
    if view.type == "contact.merge":
        # The survivor is `newObjectId` when HubSpot made one, else the primary contact.
        survivor = _id(payload.get("newObjectId")) or _id(payload.get("primaryObjectId"))
        merged = [_id(value) for value in _ids(payload.get("mergedObjectIds"))]
        merged.append(_id(payload.get("primaryObjectId")))
        if survivor is None:
            return None
        return ContactChange(
            event_id=view.id,
            type=view.type,
            contact_id=survivor,
            occurred_at=view.occurred_at,
            merged_ids=tuple(m for m in dict.fromkeys(merged) if m and m != survivor),
        )
    contact_id = _id(payload.get("objectId"))
    if contact_id is None:
        return None
    name, value = payload.get("propertyName"), payload.get("propertyValue")
    return ContactChange(
        event_id=view.id,
        type=view.type,
        contact_id=contact_id,
        occurred_at=view.occurred_at,
        # A name that is no text names no property Hubline indexes.
        property_name=name if isinstance(name, str) else None,
        property_value=None if value is None else str(value),
    )


@registry.handler(*CONTACT_EVENT_TYPES, batch_size=100)
async def handle_contact_events(
    context: HandlerContext, events: list[EventView]
) -> dict[int, Outcome]:
    """Turn a run of contact events into index writes, one `Done` per event."""
    services = context.services
    portal_id = context.portal_id
    outcomes: dict[int, Outcome] = {}
    changes: list[ContactChange] = []
    for view in events:
        if not view.payload:
            outcomes[view.id] = Done(result={"skipped": "payload deleted"})
            continue
        change = parse_change(view)
        if change is None:
            outcomes[view.id] = PermanentError(f"{view.type} event without a usable contact id")
            continue
        changes.append(change)

    involved = {c.contact_id for c in changes} | {m for c in changes for m in c.merged_ids}
    async with services.sessions() as session:
        portal = await get_portal(portal_id, session=session)
        erased = await identity.erased_contacts(portal_id, involved, session=session)
    region = (portal.default_phone_region if portal else None) or (
        services.settings.default_phone_region
    )
    doomed = erased | {c.contact_id for c in changes if c.type == PRIVACY_DELETION}
    to_read = {c.contact_id for c in changes if c.needs_read} - doomed
    read_at = utcnow()
    current = await read_contacts(context, sorted(to_read))

    plan = _Plan(portal_id, services.cipher, region, to_read, current, read_at, erased)
    for change in changes:
        outcomes[change.event_id] = plan.outcome(change, changes)
    return outcomes


async def read_contacts(
    context: HandlerContext, contact_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """The phones and email of these contacts now; a contact HubSpot no longer has is left out."""
    found: dict[str, dict[str, Any]] = {}
    if not contact_ids:
        return found
    client = hubspot_client(context.services, context.portal_id)
    for start in range(0, len(contact_ids), BATCH_READ_LIMIT):
        chunk = contact_ids[start : start + BATCH_READ_LIMIT]
        body = {"properties": READ_PROPERTIES, "inputs": [{"id": c} for c in chunk]}
        try:
            answer = await client.post_json(BATCH_READ_PATH, body)
        except HubSpotError as error:
            if error.status_code == 404:  # none of them exists any more
                continue
            raise
        for record in (answer or {}).get("results") or []:
            record_id = _id(record.get("id"))
            if record_id is not None:
                found[record_id] = record.get("properties") or {}
    return found


@dataclass
class _Plan:
    """Decides each event's outcome in order, tracking contacts erased earlier in the run."""

    portal_id: int
    cipher: TokenCipher
    region: str
    read: set[str]
    current: dict[str, dict[str, Any]]
    read_at: datetime
    erased: set[str] = field(default_factory=set)

    def outcome(self, change: ContactChange, run: list[ContactChange]) -> Outcome:
        contact_id = change.contact_id
        if contact_id in self.erased:
            # Whatever arrives about an erased contact is dropped, and so is its payload.
            return Done(
                result={"skipped": "contact erased"},
                contact_id=contact_id,
                write=_purge_payloads([change.event_id]),
            )
        if change.type == PRIVACY_DELETION:
            self.erased.add(contact_id)
            same_contact = [c.event_id for c in run if contact_id in (c.contact_id, *c.merged_ids)]
            return Done(
                result={"action": "erased"},
                contact_id=contact_id,
                write=self._erase(contact_id, same_contact, change.occurred_at),
            )
        if change.type == "contact.deletion":
            return Done(
                result={"action": "removed"},
                contact_id=contact_id,
                write=self._remove(contact_id, change.occurred_at),
            )
        if change.type == "contact.merge":
            return Done(
                result={"action": "merged", "merged": len(change.merged_ids)},
                contact_id=contact_id,
                write=self._merge(change.merged_ids, contact_id, change.occurred_at),
            )
        if (
            change.type == "contact.propertyChange"
            and change.property_name not in INDEXED_PROPERTIES
        ):
            return Done(result={"skipped": "property not indexed"}, contact_id=contact_id)
        if contact_id in self.read:
            properties = self.current.get(contact_id)
            if properties is None:
                return Done(result={"skipped": "contact not found"}, contact_id=contact_id)
            phones = [
                phone
                for phone in (
                    identity.normalize_phone(properties.get("phone"), self.region),
                    identity.normalize_phone(properties.get("mobilephone"), self.region),
                )
                if phone
            ]
            email = identity.normalize_email(properties.get("email"))
            return Done(
                result={"action": "indexed", "phones": len(phones), "emails": int(bool(email))},
                contact_id=contact_id,
                write=self._set(contact_id, phones, [email] if email else []),
            )
        if change.needs_read:
            # Not read because a privacy deletion of it comes later in this run.
            return Done(result={"skipped": "contact being erased"}, contact_id=contact_id)
        # An email change that carries its value (the contact was not read in this run).
        email = identity.normalize_email(change.property_value)
        return Done(
            result={"action": "email_changed" if email else "email_cleared"},
            contact_id=contact_id,
            write=self._set_email(contact_id, email, change.occurred_at),
        )

    def _set(self, contact_id: str, phones: list[str], emails: list[str]) -> Write:
        async def write(session: AsyncSession) -> None:
            await identity.set_identities(
                self.portal_id,
                contact_id,
                phones=phones,
                emails=emails,
                session=session,
                cipher=self.cipher,
                as_of=self.read_at,
            )

        return write

    def _set_email(self, contact_id: str, email: str | None, occurred_at: datetime) -> Write:
        async def write(session: AsyncSession) -> None:
            changed = await identity.last_change(
                self.portal_id, contact_id, identity.EMAIL, session=session
            )
            if changed is not None and changed >= occurred_at:
                return  # the index already holds something newer than this event
            await identity.replace_kind(
                self.portal_id,
                contact_id,
                identity.EMAIL,
                [email] if email else [],
                session=session,
                cipher=self.cipher,
                as_of=occurred_at,
            )

        return write

    def _remove(self, contact_id: str, occurred_at: datetime) -> Write:
        async def write(session: AsyncSession) -> None:
            await identity.remove_contact(
                self.portal_id, contact_id, session=session, as_of=occurred_at
            )

        return write

    def _merge(self, merged_ids: tuple[str, ...], survivor: str, occurred_at: datetime) -> Write:
        async def write(session: AsyncSession) -> None:
            await identity.repoint(
                self.portal_id, merged_ids, survivor, session=session, as_of=occurred_at
            )
            # The survivor's events include the merged contacts', so a later privacy
            # deletion of the survivor reaches them too.
            await session.execute(
                sa.update(InboxEvent)
                .where(
                    col(InboxEvent.portal_id) == self.portal_id,
                    col(InboxEvent.contact_id).in_(merged_ids),
                )
                .values(contact_id=survivor)
                .execution_options(synchronize_session=False)
            )

        return write

    def _erase(self, contact_id: str, same_run: list[int], deleted_at: datetime) -> Write:
        async def write(session: AsyncSession) -> None:
            purged = await erase_contact_data(
                self.portal_id,
                contact_id,
                session=session,
                cipher=self.cipher,
                also=same_run,
                deleted_at=deleted_at,
            )
            log.info("privacy deletion: erased a contact's data from %d events", purged)

        return write


def _purge_payloads(event_ids: list[int]) -> Write:
    async def write(session: AsyncSession) -> None:
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id).in_(event_ids))
            .values(payload_ct=None, key_id=None)
            .execution_options(synchronize_session=False)
        )

    return write


async def erase_contact_data(
    portal_id: int,
    contact_id: str,
    *,
    session: AsyncSession,
    cipher: TokenCipher,
    also: Iterable[int] = (),
    as_of: datetime | None = None,
    deleted_at: datetime | None = None,
) -> int:
    """Erase a privacy-deleted contact: its index entries and every stored caller detail.

    Deletes the payloads of the contact's events (by `contact_id`, plus `also`), and of
    any event that concerns it: HubSpot events about it, and receptionist events whose
    caller's phone or email hashes to one the contact had. Unfinished ones among them are
    finished as skipped, so nothing recreates the person in HubSpot. A receptionist event
    its sender dated after `deleted_at` (when HubSpot deleted the contact), and that
    arrived after it too, is the person getting in touch again, not the erased contact's
    data: it is left to sync as a new caller's, as it would have if the deletion had been
    handled before it arrived. One the sender did not date may be an older call that
    arrived late (a retry after an outage): it is erased. Returns how many events lost
    their payload.
    """
    hashes = await identity.erase_contact(
        portal_id, contact_id, session=session, as_of=as_of or utcnow()
    )
    matched = set(also)
    # Every event that still holds a payload, handled ones included: one handled before
    # its contact was known (or by a handler that sets no contact id) can hold the caller.
    rows = await session.execute(
        sa.select(InboxEvent).where(
            col(InboxEvent.portal_id) == portal_id,
            col(InboxEvent.payload_ct).is_not(None),
        )
    )
    for row in rows.scalars():
        assert row.id is not None
        try:
            payload = read_payload(row, cipher)
        except CryptoError:
            continue  # unreadable by any configured key: it reveals nothing either
        if (
            deleted_at is not None
            and row.source == EventSource.receptionist
            and payload.get("occurred_at_given") is True
            and row.occurred_at > deleted_at
            and row.received_at > deleted_at
            and row.contact_id != contact_id
        ):
            continue
        if _concerns(row.source, payload, contact_id, hashes, cipher, portal_id):
            matched.add(row.id)
    about_contact = col(InboxEvent.contact_id) == contact_id
    if matched:
        about_contact = sa.or_(about_contact, col(InboxEvent.id).in_(matched))
    result = await session.execute(
        sa.update(InboxEvent)
        .where(col(InboxEvent.portal_id) == portal_id, about_contact)
        .where(col(InboxEvent.payload_ct).is_not(None))
        .values(payload_ct=None, key_id=None)
        .execution_options(synchronize_session=False)
    )
    purged = rowcount(result)
    if matched:
        await session.execute(
            sa.update(InboxEvent)
            .where(
                col(InboxEvent.id).in_(matched),
                # In-progress events belong to the running batch: the worker finishes them.
                col(InboxEvent.status).in_(
                    [EventStatus.pending, EventStatus.parked, EventStatus.failed]
                ),
            )
            .values(
                status=EventStatus.skipped,
                contact_id=contact_id,
                finished_at=utcnow(),
                result='{"skipped": "contact erased by a privacy deletion"}',
                last_error=None,
            )
            .execution_options(synchronize_session=False)
        )
    return purged


def _concerns(
    source: str,
    payload: dict[str, Any],
    contact_id: str,
    hashes: set[tuple[str, str]],
    cipher: TokenCipher,
    portal_id: int,
) -> bool:
    if source == EventSource.hubspot:
        ids = [payload.get(key) for key in ("objectId", "primaryObjectId", "newObjectId")]
        ids.extend(_ids(payload.get("mergedObjectIds")))
        return contact_id in {_id(value) for value in ids}
    if source == EventSource.internal:
        # Work a sync queued for later (a note, an attendance) names its contact.
        return _id(payload.get("contact_id")) == contact_id
    if source == EventSource.receptionist and hashes:
        caller = payload.get("caller") or {}
        return identity.CallerHashes.of(
            cipher, portal_id, phone=caller.get("phone_e164"), email=caller.get("email")
        ).matches(hashes)
    return False
