"""The identity index: which HubSpot contact a caller's phone or email belongs to, per portal.

It is a blind index: rows hold keyed hashes of normalized values (`TokenCipher.blind_index`),
never a phone or an email, so a copy of the table reveals no caller. It is a cache kept
up to date by HubSpot's contact webhooks; whoever reads it must stay correct when it is
stale or empty (confirm with HubSpot before trusting a hit for anything irreversible).

Kinds of rows:
- `phone` (E.164) and `email` (lowercase) entries: value hash → contact id. A deleted
  contact's entries are kept with `removed_at` set (lookups skip them) so that a privacy
  deletion arriving after the deletion still knows which callers were that contact.
- `erased` markers: the contact was privacy-deleted (`value_hash` is `contact:<id>`, no
  personal data); events about it that arrive later are dropped, not indexed.

Lookups try the hash under every configured key (`blind_indexes`), so the index keeps
working while keys rotate; writes store the hash under the primary key and drop the
same value's rows under older keys. Functions take `*, session` and never commit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import phonenumbers
import sqlalchemy as sa
from phonenumbers import Leniency
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.crypto import TokenCipher
from app.db import rowcount
from app.models import IdentityEntry, InboxEvent, Portal, PortalStatus

PHONE = "phone"
EMAIL = "email"
ERASED = "erased"
VALUE_KINDS = (PHONE, EMAIL)

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_MAX_PHONE_INPUT = 64


def normalize_phone(raw: str | None, region: str) -> str | None:
    """The number in E.164, reading one without a country code in `region`; None if not one."""
    if not raw or len(raw) > _MAX_PHONE_INPUT:
        return None
    found = _possible(raw, region)
    if found is None and raw.lstrip().startswith("00"):
        # 00 is the international prefix of most of the world, though not of the region
        # (the US dials 011): "0044 20 7946 0958" is a London number from anywhere.
        found = _possible("+" + raw.lstrip()[2:], region)
    if found is None:
        # A number typed with a word beside it ("+1 415 555 0100 (cell)", "… / office"):
        # parsed whole, the words read as a vanity number's letters, too long to dial.
        # HubSpot's search finds such a contact by its digits; unread here, the caller
        # was taken for someone new and the contact made twice.
        found = _number_within(raw, region)
    return found


def _number_within(text: str, region: str) -> str | None:
    for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=Leniency.POSSIBLE):
        return _dialable(match.number)  # the first: a second is rarely the caller's
    return None


def _possible(raw: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    return _dialable(number)


def _dialable(number: phonenumbers.PhoneNumber) -> str | None:
    # "Possible" rather than "valid": valid depends on numbering-plan metadata that lags
    # behind new area codes, and refusing a real caller's number is worse than a cache
    # miss. Not "possible only locally": seven digits without an area code dial nobody.
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    formatted: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return formatted


def normalize_email(raw: str | None) -> str | None:
    """The address trimmed and lowercased; None when it is not an email address."""
    if not raw:
        return None
    email = raw.strip().lower()
    if len(email) > 320 or not _EMAIL_RE.fullmatch(email) or not _is_text(email):
        return None
    return email


def _is_text(value: str) -> bool:
    """False for a string holding a lone surrogate."""
    # JSON's escapes allow one ("\\ud800"), but it is no character, and nothing can
    # encode it: a keyed hash of it raised.
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def value_hashes(cipher: TokenCipher, kind: str, normalized: str, portal_id: int) -> list[str]:
    """The value's hash under every configured key; the first is what gets stored."""
    return cipher.blind_indexes(kind, normalized, portal_id)


def erased_marker(contact_id: str) -> str:
    return f"contact:{contact_id}"


# --- lookups ------------------------------------------------------------------------


async def lookup(
    portal_id: int, kind: str, normalized: str, *, session: AsyncSession, cipher: TokenCipher
) -> str | None:
    """The contact id indexed for this normalized phone or email, or None."""
    hashes = value_hashes(cipher, kind, normalized, portal_id)
    rows = await session.execute(
        sa.select(col(IdentityEntry.value_hash), col(IdentityEntry.contact_id)).where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.kind) == kind,
            col(IdentityEntry.value_hash).in_(hashes),
            col(IdentityEntry.removed_at).is_(None),
        )
    )
    found = dict(rows.all())
    # Prefer the hash under the newest key: an older key's row may predate a change.
    return next((found[value_hash] for value_hash in hashes if value_hash in found), None)


async def find_contact(
    portal_id: int,
    *,
    phones: Iterable[str] = (),
    emails: Iterable[str] = (),
    session: AsyncSession,
    cipher: TokenCipher,
) -> str | None:
    """The contact for a caller: by phone first (in the order given), then by email."""
    candidates = [(PHONE, phone) for phone in phones] + [(EMAIL, email) for email in emails]
    for kind, normalized in candidates:
        contact_id = await lookup(portal_id, kind, normalized, session=session, cipher=cipher)
        if contact_id is not None:
            return contact_id
    return None


async def contact_hashes(
    portal_id: int, contact_id: str, *, session: AsyncSession, include_removed: bool = True
) -> set[tuple[str, str]]:
    """The (kind, value hash) pairs indexed for a contact (removed ones too, by default)."""
    query = sa.select(col(IdentityEntry.kind), col(IdentityEntry.value_hash)).where(
        col(IdentityEntry.portal_id) == portal_id,
        col(IdentityEntry.contact_id) == contact_id,
        col(IdentityEntry.kind).in_(VALUE_KINDS),
    )
    if not include_removed:
        query = query.where(col(IdentityEntry.removed_at).is_(None))
    return {(kind, value_hash) for kind, value_hash in await session.execute(query)}


async def last_change(
    portal_id: int, contact_id: str, kind: str, *, session: AsyncSession
) -> datetime | None:
    """When the contact's entries of this kind last changed (written or removed), if ever."""
    entries = await session.execute(
        sa.select(col(IdentityEntry.updated_at), col(IdentityEntry.removed_at)).where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.contact_id) == contact_id,
            col(IdentityEntry.kind) == kind,
        )
    )
    moments = [moment for row in entries for moment in row if moment is not None]
    return max(moments, default=None)


async def erased_contacts(
    portal_id: int, contact_ids: Iterable[str], *, session: AsyncSession
) -> set[str]:
    """Which of these contacts were privacy-deleted."""
    markers = {erased_marker(contact_id): contact_id for contact_id in contact_ids}
    if not markers:
        return set()
    rows = await session.execute(
        sa.select(col(IdentityEntry.value_hash)).where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.kind) == ERASED,
            col(IdentityEntry.value_hash).in_(list(markers)),
        )
    )
    return {markers[value_hash] for value_hash in rows.scalars()}


# --- writes -------------------------------------------------------------------------


async def upsert(
    portal_id: int,
    kind: str,
    normalized: str,
    contact_id: str,
    *,
    session: AsyncSession,
    cipher: TokenCipher,
    as_of: datetime,
) -> None:
    """Point this phone or email at the contact (whichever contact it pointed at before)."""
    hashes = value_hashes(cipher, kind, normalized, portal_id)
    if len(hashes) > 1:
        await session.execute(
            sa.delete(IdentityEntry)
            .where(
                col(IdentityEntry.portal_id) == portal_id,
                col(IdentityEntry.kind) == kind,
                col(IdentityEntry.value_hash).in_(hashes[1:]),
            )
            .execution_options(synchronize_session=False)
        )
    changes: dict[str, Any] = {"contact_id": contact_id, "updated_at": as_of, "removed_at": None}
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    await session.execute(
        insert(IdentityEntry)
        .values(portal_id=portal_id, kind=kind, value_hash=hashes[0], **changes)
        .on_conflict_do_update(index_elements=["portal_id", "kind", "value_hash"], set_=changes)
    )


async def replace_kind(
    portal_id: int,
    contact_id: str,
    kind: str,
    values: Iterable[str],
    *,
    session: AsyncSession,
    cipher: TokenCipher,
    as_of: datetime,
) -> None:
    """Make `values` (normalized) the contact's only entries of this kind."""
    keep: list[str] = []
    for normalized in dict.fromkeys(values):
        await upsert(
            portal_id, kind, normalized, contact_id, session=session, cipher=cipher, as_of=as_of
        )
        keep.append(cipher.blind_index(kind, normalized, portal_id))
    await session.execute(
        sa.delete(IdentityEntry)
        .where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.contact_id) == contact_id,
            col(IdentityEntry.kind) == kind,
            col(IdentityEntry.value_hash).not_in(keep),
        )
        .execution_options(synchronize_session=False)
    )


async def set_identities(
    portal_id: int,
    contact_id: str,
    *,
    phones: Iterable[str],
    emails: Iterable[str],
    session: AsyncSession,
    cipher: TokenCipher,
    as_of: datetime,
) -> None:
    """Make these normalized phones and emails the contact's entries, reviving a removed one."""
    for kind, values in ((PHONE, phones), (EMAIL, emails)):
        await replace_kind(
            portal_id, contact_id, kind, values, session=session, cipher=cipher, as_of=as_of
        )


async def set_many(
    portal_id: int,
    contacts: Mapping[str, tuple[Iterable[str], Iterable[str]]],
    *,
    session: AsyncSession,
    cipher: TokenCipher,
    as_of: datetime,
) -> None:
    """`set_identities` for many contacts (contact id → (phones, emails)) in three statements.

    The result is the same as calling `set_identities` for each contact in order: a value
    listed for two contacts ends up pointing at the later one.
    """
    if not contacts:
        return
    owner: dict[tuple[str, str], str] = {}  # (kind, primary hash) → contact id; later wins
    older: dict[str, set[str]] = {PHONE: set(), EMAIL: set()}
    for contact_id, (phones, emails) in contacts.items():
        for kind, values in ((PHONE, phones), (EMAIL, emails)):
            for normalized in values:
                hashes = value_hashes(cipher, kind, normalized, portal_id)
                owner[(kind, hashes[0])] = contact_id
                older[kind].update(hashes[1:])
    of_kind = sa.and_(
        col(IdentityEntry.portal_id) == portal_id,
        col(IdentityEntry.kind).in_(VALUE_KINDS),
    )
    if older[PHONE] or older[EMAIL]:
        await session.execute(
            sa.delete(IdentityEntry)
            .where(
                of_kind,
                sa.or_(
                    *(
                        sa.and_(
                            col(IdentityEntry.kind) == kind,
                            col(IdentityEntry.value_hash).in_(sorted(hashes)),
                        )
                        for kind, hashes in older.items()
                        if hashes
                    )
                ),
            )
            .execution_options(synchronize_session=False)
        )
    # Sorted, so concurrent writers of overlapping values lock rows in the same order.
    rows = [
        {
            "portal_id": portal_id,
            "kind": kind,
            "value_hash": value_hash,
            "contact_id": contact_id,
            "updated_at": as_of,
            "removed_at": None,
        }
        for (kind, value_hash), contact_id in sorted(owner.items())
    ]
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    # One statement run with many parameter sets (compiled once, cached), on the table:
    # the ORM's bulk-insert path would cost more than the database does.
    table: sa.Table = IdentityEntry.__table__  # type: ignore[attr-defined]
    statement = insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=["portal_id", "kind", "value_hash"],
        set_={
            "contact_id": statement.excluded.contact_id,
            "updated_at": statement.excluded.updated_at,
            "removed_at": None,
        },
    )
    if rows:  # none when no contact has a value left (an empty parameter list is no insert)
        await (await session.connection()).execute(statement, rows)
    # Each contact keeps only what was just written for it; a value written for a later
    # contact already points there, so one statement drops every contact's other entries.
    kept = {
        kind: sorted(value_hash for (k, value_hash) in owner if k == kind) for kind in VALUE_KINDS
    }
    await session.execute(
        sa.delete(IdentityEntry)
        .where(
            of_kind,
            col(IdentityEntry.contact_id).in_(sorted(contacts)),
            sa.or_(
                *(
                    sa.and_(
                        col(IdentityEntry.kind) == kind,
                        col(IdentityEntry.value_hash).not_in(kept[kind]),
                    )
                    for kind in VALUE_KINDS
                )
            ),
        )
        .execution_options(synchronize_session=False)
    )


async def remove_contact(
    portal_id: int, contact_id: str, *, session: AsyncSession, as_of: datetime
) -> int:
    """Take a deleted contact out of lookups (its entries stay, marked); returns how many."""
    result = await session.execute(
        sa.update(IdentityEntry)
        .where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.contact_id) == contact_id,
            col(IdentityEntry.kind).in_(VALUE_KINDS),
            col(IdentityEntry.removed_at).is_(None),
        )
        .values(removed_at=as_of)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


async def repoint(
    portal_id: int,
    merged_ids: Iterable[str],
    survivor_id: str,
    *,
    session: AsyncSession,
    as_of: datetime,
) -> int:
    """Point the entries of merged contacts at the contact that survived the merge."""
    merged = [contact_id for contact_id in merged_ids if contact_id != survivor_id]
    if not merged:
        return 0
    result = await session.execute(
        sa.update(IdentityEntry)
        .where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.contact_id).in_(merged),
            col(IdentityEntry.kind).in_(VALUE_KINDS),
        )
        .values(contact_id=survivor_id, updated_at=as_of)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


async def erase_contact(
    portal_id: int, contact_id: str, *, session: AsyncSession, as_of: datetime
) -> set[tuple[str, str]]:
    """Delete every entry of a privacy-deleted contact and mark it erased.

    Returns the (kind, value hash) pairs it had, removed ones included, so the caller can
    find other records of the same person.
    """
    hashes = await contact_hashes(portal_id, contact_id, session=session)
    await session.execute(
        sa.delete(IdentityEntry)
        .where(
            col(IdentityEntry.portal_id) == portal_id,
            col(IdentityEntry.contact_id) == contact_id,
            col(IdentityEntry.kind).in_(VALUE_KINDS),
        )
        .execution_options(synchronize_session=False)
    )
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    await session.execute(
        insert(IdentityEntry)
        .values(
            portal_id=portal_id,
            kind=ERASED,
            value_hash=erased_marker(contact_id),
            contact_id=contact_id,
            updated_at=as_of,
            removed_at=as_of,
        )
        .on_conflict_do_nothing(index_elements=["portal_id", "kind", "value_hash"])
    )
    return hashes


async def purge_removed(*, session: AsyncSession, before: datetime) -> int:
    """Delete entries and markers of contacts removed before `before` (retention)."""
    result = await session.execute(
        sa.delete(IdentityEntry)
        .where(col(IdentityEntry.removed_at) < before)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


async def purge_uninstalled(*, session: AsyncSession, before: datetime) -> int:
    """Delete the entries of portals uninstalled before `before`, once no event holds a caller."""
    # Kept while any of the portal's events holds a payload (a parked call, a failed
    # one within its retention): a privacy deletion finds their callers through it. With
    # those gone it serves nothing, and a reinstall searches afresh.
    holding = sa.select(col(InboxEvent.id)).where(
        col(InboxEvent.portal_id) == col(Portal.portal_id),
        col(InboxEvent.payload_ct).is_not(None),
    )
    long_gone = sa.select(col(Portal.portal_id)).where(
        col(Portal.status) == PortalStatus.uninstalled,
        col(Portal.uninstalled_at) < before,
        ~sa.exists(holding),
    )
    result = await session.execute(
        sa.delete(IdentityEntry)
        .where(col(IdentityEntry.portal_id).in_(long_gone))
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


@dataclass(frozen=True)
class CallerHashes:
    """A caller's normalized phone and email as index hashes under every key (for matching)."""

    hashes: frozenset[tuple[str, str]]

    @classmethod
    def of(
        cls, cipher: TokenCipher, portal_id: int, *, phone: str | None, email: str | None
    ) -> CallerHashes:
        pairs: set[tuple[str, str]] = set()
        for kind, normalized in ((PHONE, phone), (EMAIL, email)):
            if normalized:
                pairs.update(
                    (kind, value_hash)
                    for value_hash in value_hashes(cipher, kind, normalized, portal_id)
                )
        return cls(frozenset(pairs))

    def matches(self, indexed: set[tuple[str, str]]) -> bool:
        return not self.hashes.isdisjoint(indexed)
