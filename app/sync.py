"""Receptionist events → the portal's CRM, a batch of up to 100 events at a time.

For one batch of one portal Hubline spends a handful of HubSpot requests, not several per
event:

1. Callers are looked up in the identity index; ONE search asks HubSpot for the callers it
   does not know (OR'd filter groups: the digits-only calculated phone and mobile numbers,
   email) and fetches the current properties of the known contacts in the same request
   (`hs_object_id IN`); when every caller is known, one batch read fetches them instead.
   Phone candidates are confirmed by normalizing their `phone` and `mobilephone` to
   E.164, so a number a person typed as "(415) 555-0100" matches.
2. Callers still unknown are grouped (the same phone or email twice in a batch is one
   person) and created with one batch create; the index learns every contact at once,
   in its own transaction, so the next batch needs no search despite HubSpot's search lag.
3. Existing contacts get one batch update: Hubline's AI properties are overwritten and
   `sync_error_message` cleared; `firstname`, `lastname`, `email`, `phone`, `lead_source`
   are filled only where empty, so a person's edits are never overwritten.
4. One batch create of calls and one of notes, each with its contact association. A full
   batch (a backlog: more events wait behind it) queues its texts' and chats' notes
   instead, as `receptionist.note` events written a hundred to a request: with a tenth of
   the events being texts, a note request per batch would be a quarter of the portal's
   budget for a tenth of its events. They wait for a full request at most 10 s, or until
   the portal has nothing else to do.
5. Campaign attendance (see `app.campaigns`): what HubSpot cannot take now is queued as
   its own event, and the receptionist event, whose CRM work is done, is done.

A batch HubSpot rejects for one record is split until the bad record stands alone: the
others sync; the bad one's event fails with HubSpot's reason, which is also written to the
contact's `sync_error_message`. A 409 on a duplicate email resolves to the existing contact.

No event ever produces two engagements. The event → engagement mapping is recorded in the
transaction that marks the event done. Before creating engagements, Hubline commits an
intent (an `engagements` row with an empty `engagement_id`); an event that comes back with
an intent but no mapping may have an engagement HubSpot made before a crash, so HubSpot is
asked first: through the contact's associations (read-after-write consistent) when the
intent is recent, else by a search for the contact's call or note at the event's exact
`hs_timestamp` with Hubline's title.

Nothing here logs a caller's phone, email, name or summary.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar, cast

import phonenumbers
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app import campaigns, identity, properties
from app.crypto import TokenCipher
from app.db import transaction
from app.errors import (
    ContactGone,
    HandlerError,
    HubSpotConflict,
    HubSpotError,
    HubSpotValidationError,
    PermanentError,
    UnrecordedWrite,
)
from app.hubspot import HubSpotClient, hubspot_client
from app.hubspot.times import millis, stamp
from app.inbox import (
    Done,
    EventView,
    HandlerContext,
    NewEvent,
    Outcome,
    Write,
    enqueue_many,
    registry,
)
from app.models import (
    EngagementRecord,
    EventSource,
    EventStatus,
    IdentityEntry,
    InboxEvent,
    Portal,
    utcnow,
)
from app.portals import problem_codes
from app.properties import BOOL, NUMBER, OPTION, STRING, PortalProperties
from app.receptionist import PING, ReceptionistEvent, is_https_address

if TYPE_CHECKING:
    from app.main import Services

log = logging.getLogger(__name__)

CALL = "call.completed"
TEXT = "text.received"
CHAT = "chat.completed"
RECEPTIONIST_TYPES = (CALL, TEXT, CHAT, PING)
# The note of a text or chat synced in a full batch, written with other batches' notes.
NOTE_LATER = "receptionist.note"
# How long a queued note may wait for others to share its request.
NOTE_FILL_WAIT = timedelta(seconds=10)

CONTACTS = "/crm/v3/objects/contacts"
# Records per HubSpot batch request (its limit), and events per handler batch.
BATCH_LIMIT = 100
# Values per IN filter (HubSpot's limit); longer lists are split across filters.
IN_LIMIT = 100
MAX_FILTER_GROUPS = 5
SEARCH_PAGE = 200
CALL_TITLE = "AI receptionist call"
# Engagement ids per lookup of the ones recorded (far below the drivers' parameter limits).
_ENGAGEMENTS_PER_QUERY = 500
# Times an engagement create that may or may not have happened is settled within one attempt.
AMBIGUOUS_CREATE_ROUNDS = 3
NOTE_HEADINGS = {TEXT: "AI receptionist text", CHAT: "AI receptionist chat"}
ASSOCIATION_TYPES = {"calls": 194, "notes": 202}
# Records one association batch read may name (HubSpot's limit since February 2025).
ASSOCIATION_READ_LIMIT = 1000
NO_ASSOCIATIONS = "crm.associations.NO_ASSOCIATIONS_FOUND"
# HubSpot keeps at most 65,536 characters in a text property.
MAX_TEXT = 65_536
TRUNCATED = " … (truncated)"
# How long a new engagement may stay invisible to search; younger intents are checked
# through associations instead.
SEARCH_LAG = timedelta(seconds=60)
CONTACT_READ = [
    "firstname",
    "lastname",
    "email",
    "phone",
    "mobilephone",
    "lead_source",
    "createdate",
    "hs_object_id",
    "hs_merged_object_ids",
]
IDENTITY_FIELDS = ("firstname", "lastname", "email", "phone", "lead_source")
# Dropdowns whose options Hubline relies on: a value of theirs refused as not an option
# means an admin removed it since Hubline last looked, which one repair fixes.
REPAIRABLE_OPTIONS = ("call_outcome", "lead_source")
# The fewest digits a typed number may share with a caller's to be taken for theirs read
# under another region (subscriber numbers have at least this many).
MIN_NATIONAL_DIGITS = 6
_T = TypeVar("_T")
Key = tuple[str, str]  # (identity.PHONE | identity.EMAIL, normalized value)


# --- pure helpers ------------------------------------------------------------------------


def split_name(name: str | None) -> tuple[str | None, str | None]:
    """(firstname, lastname): the last word is the last name; one word is a first name."""
    words = (name or "").split()
    if not words:
        return None, None
    if len(words) == 1:
        return words[0], None
    return " ".join(words[:-1]), words[-1]


def phone_search_digits(e164: str) -> list[str]:
    """The calculated phone values a contact with this number may hold: the national
    number, and as written nationally where that differs (a trunk prefix: "07700900123"
    for +44 7700 900123), which is what a number typed without its country code keeps."""
    try:
        number = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return []
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    written = "".join(c for c in national if c.isascii() and c.isdigit())
    return list(dict.fromkeys(d for d in (str(number.national_number), written) if d))


def number_text(value: float) -> str:
    """Digits as a person writes them, never an exponent: repr(1e-07) is "1e-07", which
    HubSpot's documentation does not say its number properties take."""
    number = float(value)
    if number.is_integer():
        return str(int(number))
    return format(Decimal(repr(number)), "f")  # the shortest digits that read back as it


def _clip(text: str, room: int) -> str:
    if len(text) <= room:
        return text
    return text[: max(room - len(TRUNCATED), 0)] + TRUNCATED


def _html(text: str) -> str:
    return html.escape(text).replace("\r\n", "\n").replace("\n", "<br>")


def engagement_body(heading: str | None, summary: str | None, transcript: str | None) -> str:
    """Heading, summary, then transcript (cut to fit HubSpot's limit), as escaped HTML."""
    parts = [_html(part) for part in (heading, summary) if part]
    head = _clip("<br><br>".join(parts), MAX_TEXT // 2 if transcript else MAX_TEXT)
    if transcript:
        room = MAX_TEXT - len(head) - len("<br><br>")
        tail = _clip(_html(transcript), room)
        if room > len(TRUNCATED):
            return f"{head}<br><br>{tail}" if head else tail
    return head


@dataclass(frozen=True)
class PropertyError:
    """One property HubSpot named in a validation error."""

    name: str
    code: str
    message: str


_OBJECT = re.compile(r"\{[^{}]*\}")
_FIELD = {
    "name": re.compile(r'"name"\s*:\s*"([^"]*)"'),
    "code": re.compile(r'"error"\s*:\s*"([^"]*)"'),
    "message": re.compile(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"'),
}


def property_errors(error: HubSpotError) -> list[PropertyError]:
    """The per-property problems in a 400 ("Property values were not valid: [...]")."""
    found: list[PropertyError] = []
    for match in _OBJECT.finditer(error.detail):
        values = {k: pattern.search(match.group(0)) for k, pattern in _FIELD.items()}
        name, code = values["name"], values["code"]
        if name is None or code is None:
            continue
        message = values["message"]
        found.append(
            PropertyError(
                name.group(1),
                code.group(1),
                message.group(1).replace('\\"', '"') if message else "",
            )
        )
    return found


PROBLEMS = {
    "TOO_LONG": "is too long",
    "INVALID_OPTION": "is not one of the property's options",
    "INVALID_EMAIL": "is not an email address HubSpot accepts",
    "INVALID_NUMBER": "is not a number HubSpot accepts",
    "INVALID_INTEGER": "is not a number HubSpot accepts",
    "INVALID_DATE": "is not a date HubSpot accepts",
    "INVALID_BOOLEAN": "is not a yes/no value",
    "PROPERTY_DOESNT_EXIST": "does not exist",
    "READ_ONLY_VALUE": "is read-only",
    "REQUIRED_FIELD": "is required",
}


def reason_of(error: HubSpotError) -> str:
    """A short, human reason for a record HubSpot refused.

    Built from property names and error codes only: HubSpot's messages echo the values
    sent (a summary, a name), which must not reach logs or the events table.
    """
    named = property_errors(error)
    if named:
        text = "; ".join(
            f"{p.name} {PROBLEMS.get(p.code, f'was refused ({p.code})')}" for p in named
        )
    else:
        text = f"{error.category or 'error'} {error.status_code or ''}".strip()
    return f"HubSpot rejected the record: {text}"[:1000]


# --- the events of a batch ----------------------------------------------------------------


@dataclass
class Item:
    """One receptionist event being synced, and what became of it."""

    view: EventView
    event: ReceptionistEvent
    contact_id: str | None = None
    created_contact: bool = False
    failure: str | None = None  # a data error: the event fails with this reason
    retry: HandlerError | None = None  # retried alone
    engagement_id: str | None = None
    intended_for: str | None = None  # the contact an earlier attempt meant to associate
    attendance_later: campaigns.Attendance | None = None  # queued: HubSpot could not take it
    note_later: bool = False  # its note is queued as a NOTE_LATER event

    @property
    def made_for(self) -> str | None:
        """The contact an engagement made by an earlier attempt would be associated with."""
        return self.intended_for or self.contact_id

    @property
    def id(self) -> int:
        return self.view.id

    @property
    def phone(self) -> str | None:
        return self.event.caller.phone_e164

    @property
    def email(self) -> str | None:
        return self.event.caller.email

    @property
    def keys(self) -> list[Key]:
        found: list[Key] = []
        if self.phone:
            found.append((identity.PHONE, self.phone))
        if self.email:
            found.append((identity.EMAIL, self.email))
        return found

    @property
    def object_type(self) -> str:
        return "calls" if self.event.type == CALL else "notes"

    @property
    def note_heading(self) -> str:
        """The first line of its note; how a note an earlier attempt made is recognised."""
        return NOTE_HEADINGS.get(self.event.type, "AI receptionist")

    @property
    def timestamp_ms(self) -> int:
        """Its engagement's hs_timestamp, as HubSpot answers it: epoch milliseconds."""
        value = millis(stamp(self.event.occurred_at))
        assert value is not None  # a stamp always reads back
        return value

    @property
    def ok(self) -> bool:
        return self.failure is None and self.retry is None

    @property
    def synced(self) -> bool:
        """Its contact is written and its engagement made (or, for a note, queued)."""
        return self.ok and bool(self.contact_id) and bool(self.engagement_id or self.note_later)

    def ai_properties(self, state: PortalProperties, outcomes: set[str]) -> dict[str, str]:
        """Hubline's AI properties from this event, for the properties the portal can take."""
        event = self.event
        wanted: dict[str, Any] = {
            "ai_call_summary": event.summary,
            "call_outcome": event.outcome,
            "ai_lead_score": event.lead_score,
            "follow_up_required": event.follow_up_required,
            "appointment_booked": event.appointment_booked,
            "marketing_campaign_id": event.campaign_id,
        }
        values: dict[str, str] = {}
        for name, raw in wanted.items():
            use = state.use(name)
            if raw is None or raw == "" or use is None:
                continue
            if use.kind == BOOL:
                values[name] = "true" if raw else "false"
            elif use.kind == NUMBER:
                if not math.isfinite(float(raw)):
                    continue
                values[name] = number_text(float(raw))
            elif use.kind == OPTION:
                value = properties.outcome_value(str(raw), outcomes)
                if value in outcomes:
                    values[name] = value
            else:
                # A summary longer than HubSpot keeps is cut rather than lost.
                values[name] = _clip(str(raw), MAX_TEXT)
        return values


@dataclass
class Contact:
    """A HubSpot contact as read: its id and current properties."""

    id: str
    properties: dict[str, Any]

    def get(self, name: str) -> str:
        value = self.properties.get(name)
        return "" if value is None else str(value)

    def keys(self, region: str) -> set[Key]:
        found: set[Key] = set()
        for name in ("phone", "mobilephone"):
            phone = identity.normalize_phone(self.get(name) or None, region)
            if phone:
                found.add((identity.PHONE, phone))
        email = identity.normalize_email(self.get("email") or None)
        if email:
            found.add((identity.EMAIL, email))
        return found

    def may_hold(self, key: Key) -> bool:
        """Whether it may hold `key` read under another phone region: a number typed
        without its country code reads as another once the portal's region changes."""
        if key[0] != identity.PHONE:
            return False
        for name in ("phone", "mobilephone"):
            national = "".join(c for c in self.get(name) if c.isdigit()).lstrip("0")
            if len(national) >= MIN_NATIONAL_DIGITS and key[1].endswith(national):
                return True
        return False

    @property
    def order(self) -> tuple[int, int]:
        created = millis(self.properties.get("createdate")) or 0
        return created, int(self.id) if self.id.isdigit() else 0

    @classmethod
    def of(cls, record: dict[str, Any]) -> Contact:
        return cls(str(record.get("id")), dict(record.get("properties") or {}))


@dataclass
class NewContact:
    """A caller HubSpot does not have: the events of one person in this batch."""

    items: list[Item]
    phone: str | None
    email: str | None
    name: str | None
    properties: dict[str, str] = field(default_factory=dict)
    owners: dict[str, list[Item]] = field(default_factory=dict)
    contact_id: str | None = None


@dataclass
class WriteInput:
    """One input of a batch write and what it is for."""

    body: dict[str, Any]
    ref: Any


@dataclass
class Sent:
    results: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[WriteInput, HubSpotError]] = field(default_factory=list)
    missing_ids: set[str] = field(default_factory=set)


class _Components:
    """Union-find over callers' keys: the same phone or email in one batch is one person."""

    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}

    def find(self, key: Key) -> Key:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, keys: Sequence[Key]) -> None:
        for key in keys[1:]:
            self.parent[self.find(key)] = self.find(keys[0])


def _owners(
    items: Iterable[Item], state: PortalProperties, outcomes: set[str]
) -> tuple[dict[str, str], dict[str, list[Item]]]:
    """The AI properties of several events of one contact (later events win), and who set them."""
    merged: dict[str, str] = {}
    owners: dict[str, list[Item]] = {}
    for item in items:
        for name, value in item.ai_properties(state, outcomes).items():
            merged[name] = value
            owners[name] = [item]
    return merged, owners


def _behind(name: str, owners: dict[str, list[Item]], items: list[Item]) -> list[Item]:
    """The events whose data put this property's refused value in the record."""
    if name in owners:
        return owners[name]
    if name in ("firstname", "lastname"):
        return [i for i in items if i.event.caller.name]
    if name in ("email", "phone"):
        return [i for i in items if getattr(i, name)]
    return items


def _sent_identity(plan: NewContact) -> tuple[set[str], set[str]]:
    """The phones and emails a created contact holds: those its create carried."""
    phones = {plan.phone} if plan.phone and "phone" in plan.properties else set()
    emails = {plan.email} if plan.email and "email" in plan.properties else set()
    return phones, emails


async def _together(*steps: Awaitable[_T]) -> list[_T]:
    """Run independent steps at once; every one finishes before the first error is raised."""
    answers = await asyncio.gather(*steps, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return cast(list[_T], answers)


# --- the handler ----------------------------------------------------------------------------


@registry.handler(*RECEPTIONIST_TYPES, batch_size=BATCH_LIMIT)
async def handle_receptionist_events(
    ctx: HandlerContext, views: list[EventView]
) -> dict[int, Outcome]:
    """Sync a batch of one portal's receptionist events; `test.ping` never reaches the CRM."""
    outcomes: dict[int, Outcome] = {}
    items: list[Item] = []
    for view in views:
        if view.type == PING:
            outcomes[view.id] = Done(result={"ping": "ok"})
            continue
        if not view.payload:
            outcomes[view.id] = Done(result={"skipped": "payload deleted"})
            continue
        try:
            event = ReceptionistEvent.model_validate(view.payload)
        except ValidationError:
            outcomes[view.id] = PermanentError("the stored event is not a receptionist event")
            continue
        if not event.caller.phone_e164 and not event.caller.email:
            outcomes[view.id] = PermanentError("the caller has neither a phone nor an email")
            continue
        items.append(Item(view, event))
    if items:
        # A full batch means more are waiting: its notes are queued, to be written with
        # other batches' notes, as the budget allows one request for every kind of write.
        sync = BatchSync(ctx.services, ctx.portal_id, items, notes_later=len(views) >= BATCH_LIMIT)
        outcomes.update(await sync.run(contacts_written=ctx.let_next_batch_start))
    return outcomes


class BatchSync:
    """The sync of one batch: resolve callers, write contacts, engagements, campaigns."""

    def __init__(
        self,
        services: Services,
        portal_id: int,
        items: list[Item],
        *,
        notes_later: bool = False,
    ) -> None:
        self.services = services
        self.portal_id = portal_id
        self.items = items
        self.notes_later = notes_later  # queue new notes instead of writing them now
        self.client: HubSpotClient = hubspot_client(services, portal_id)
        self.region = services.settings.default_phone_region
        self.scopes: frozenset[str] = frozenset()
        self.state = PortalProperties()
        self.problems: set[str] = set()
        self.outcomes: set[str] = set()  # call_outcome values that exist in the portal
        self.match: dict[Key, str] = {}  # caller key → contact id
        self.contacts: dict[str, Contact] = {}  # existing contacts, as read
        self.new_contacts: list[NewContact] = []
        self.contact_errors: dict[str, str] = {}  # contact id → reason for sync_error_message
        self.errors_written: set[str] = set()
        self.adopted: set[str] = set()  # existing contacts new callers' creates ran into
        self._repaired: set[str] = set()  # dropdowns whose options this batch repaired
        self._recreating: set[str] = set()  # deleted properties this batch tried to recreate
        self._recreated: set[str] = set()  # ... and those HubSpot created
        self._rechecked: set[str] = set()  # properties whose type a refusal had read again
        self._indexed_created: set[str] = set()  # created contacts indexed already
        # Creates and updates go out together: adapting to the portal's properties after a
        # refusal (a deleted property, a stale option list) happens one at a time.
        self._fixing = asyncio.Lock()

    async def run(
        self, *, contacts_written: Callable[[], None] | None = None
    ) -> dict[int, Outcome]:
        """Sync the batch. `contacts_written` is called once every caller's contact is
        written and indexed: the next batch can then resolve its callers without this one."""
        await self._load()
        await self._resolve()
        await self._prepare_outcomes()
        self._plan_new_contacts()
        # New callers' creates and known contacts' updates touch different contacts.
        known = set(self.contacts)
        await _together(self._create_contacts(), self._update_contacts(known))
        # A create that ran into an existing contact (409) adopted it: update it now,
        # with every item it has, so the newest event's values still win.
        await self._read_conflicted()
        # Independent: the index write waits on the database, the updates on HubSpot.
        await _together(self._remember_identities(), self._update_contacts(self.adopted))
        # What is left (engagements, campaigns, error notes) concerns this batch's events
        # alone: the portal's next batch may resolve and write its contacts meanwhile.
        if contacts_written is not None:
            await self._name_contacts_on_events()
            contacts_written()
        await self._engagements()
        await self._campaigns()
        await self._write_contact_errors()
        return self._outcomes()

    async def write_notes(self) -> dict[int, Outcome]:
        """The engagement step alone, for events whose contact is known (queued notes)."""
        await self._load()
        await self._engagements()
        await self._write_contact_errors()
        return self._outcomes()

    def _outcomes(self) -> dict[int, Outcome]:
        synced = [i for i in self.items if i.synced]
        # One write records every engagement of the batch (and queues the notes left for
        # later); the worker runs it once, in the transaction that marks the events done.
        write = (
            _record_engagements(self.portal_id, synced, self._postgres, self.services.cipher)
            if synced
            else None
        )
        return {item.id: self._outcome(item, write) for item in self.items}

    # --- setup ------------------------------------------------------------------------

    async def _load(self) -> None:
        async with self.services.sessions() as session:
            portal = await session.get(Portal, self.portal_id)
            state = await properties.load_state(self.portal_id, session=session)
            self.problems = await problem_codes(self.portal_id, session=session)
        if portal is not None:
            self.scopes = portal.scope_set
            self.region = portal.default_phone_region or self.region
        # Events can arrive before the install's provisioning ran (or after it failed).
        self.state = state or await properties.provision(self.services, self.portal_id)

    async def _prepare_outcomes(self) -> None:
        labels = [i.event.outcome for i in self.items if i.event.outcome]
        if labels:
            self.outcomes = await properties.ensure_outcome_options(
                self.services,
                self.client,
                self.state,
                labels,
                problems=self.problems,
                scopes=self.scopes,
            )

    # --- 1. who are the callers -------------------------------------------------------

    async def _resolve(self) -> None:
        keys = list(dict.fromkeys(key for item in self.items for key in item.keys))
        known = await self._lookup_index(keys)
        unknown = [key for key in keys if key not in known]
        found: dict[str, Contact] = {}
        if unknown:
            found.update(await self._search(unknown, set(known.values())))
        # An index entry is a hint: its contact may have been deleted since, or no longer
        # hold the phone or email (changed while the app was uninstalled, or with no
        # webhook to tell). Contacts the search did not show, or showed without the
        # indexed value (search results lag behind a contact's latest values), are read
        # by id, which does not lag.
        unconfirmed = {
            contact_id
            for key, contact_id in known.items()
            if contact_id not in found or key not in found[contact_id].keys(self.region)
        }
        if unconfirmed:
            read = await self._read_contacts(sorted(unconfirmed))
            gone: list[Key] = []
            doubted: dict[Key, str] = {}
            for key, contact_id in list(known.items()):
                if contact_id not in unconfirmed:
                    continue
                contact = read.get(contact_id)
                if contact is None:
                    del known[key]  # deleted since it was indexed
                    gone.append(key)
                    continue
                known[key] = contact.id  # merged contacts answer as the survivor
                found[contact.id] = contact
                if key in contact.keys(self.region):
                    continue
                if contact.id == contact_id and not contact.may_hold(key):
                    # The contact itself no longer holds it (changed with no webhook to
                    # tell, or before it came): not taken for the caller, as the webhook
                    # would have had it.
                    del known[key]
                    gone.append(key)
                else:
                    doubted[key] = contact.id
            if gone or doubted:
                searched = await self._search([*gone, *doubted], set())
                found.update(searched)
                for key, contact_id in doubted.items():
                    # Another contact holding the value now is the caller's. With none,
                    # the hint stands: a merge keeps the survivor's own phone, and a
                    # region changed since reads a number typed nationally otherwise.
                    holders = [c for c in searched.values() if key in c.keys(self.region)]
                    if any(holder.id != contact_id for holder in holders):
                        del known[key]
        self.contacts = found
        by_key: dict[Key, list[Contact]] = defaultdict(list)
        for contact in found.values():
            for key in contact.keys(self.region):
                by_key[key].append(contact)
        for key in keys:
            if key in known:
                self.match[key] = known[key]
            elif by_key.get(key):
                self.match[key] = min(by_key[key], key=lambda c: c.order).id
        components = _Components()
        for item in self.items:
            components.union(item.keys)
        component_match: dict[Key, str] = {}
        for key in sorted(self.match, key=lambda k: k[0] != identity.PHONE):
            component_match.setdefault(components.find(key), self.match[key])
        for item in self.items:
            own = [self.match[key] for key in item.keys if key in self.match]
            if own:
                item.contact_id = own[0]  # by phone first, then by email
            else:
                item.contact_id = component_match.get(components.find(item.keys[0]))

    async def _lookup_index(self, keys: list[Key]) -> dict[Key, str]:
        """Index lookups for many keys in one query; the newest key's hash wins."""
        cipher = self.services.cipher
        hashes = {
            key: identity.value_hashes(cipher, key[0], key[1], self.portal_id) for key in keys
        }
        wanted = {h for values in hashes.values() for h in values}
        if not wanted:
            return {}
        async with self.services.sessions() as session:
            rows = await session.execute(
                sa.select(
                    col(IdentityEntry.kind),
                    col(IdentityEntry.value_hash),
                    col(IdentityEntry.contact_id),
                ).where(
                    col(IdentityEntry.portal_id) == self.portal_id,
                    col(IdentityEntry.kind).in_(identity.VALUE_KINDS),
                    col(IdentityEntry.value_hash).in_(wanted),
                    col(IdentityEntry.removed_at).is_(None),
                )
            )
            stored = {(row[0], row[1]): row[2] for row in rows}
        found: dict[Key, str] = {}
        for key, values in hashes.items():
            contact = next((stored[(key[0], h)] for h in values if (key[0], h) in stored), None)
            if contact is not None:
                found[key] = contact
        return found

    async def _search(self, keys: list[Key], contact_ids: set[str]) -> dict[str, Contact]:
        """One search (more only beyond HubSpot's filter limits) for callers and known ids."""
        digits = sorted(
            {
                digits
                for kind, value in keys
                if kind == identity.PHONE
                for digits in phone_search_digits(value)
            }
        )
        emails = sorted({value for kind, value in keys if kind == identity.EMAIL})
        filters: list[tuple[str, list[str]]] = []
        for name, values in (
            ("hs_searchable_calculated_phone_number", digits),
            ("hs_searchable_calculated_mobile_number", digits),
            ("email", emails),
            ("hs_object_id", sorted(contact_ids)),
        ):
            for start in range(0, len(values), IN_LIMIT):
                filters.append((name, [v for v in values[start : start + IN_LIMIT] if v]))
        found: dict[str, Contact] = {}
        for start in range(0, len(filters), MAX_FILTER_GROUPS):
            groups = [
                {"filters": [{"propertyName": name, "operator": "IN", "values": values}]}
                for name, values in filters[start : start + MAX_FILTER_GROUPS]
                if values
            ]
            if groups:
                for record in await self._search_all(f"{CONTACTS}/search", groups, CONTACT_READ):
                    contact = Contact.of(record)
                    found[contact.id] = contact
        return found

    async def _search_all(
        self, path: str, groups: list[dict[str, Any]], names: list[str]
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            body: dict[str, Any] = {"filterGroups": groups, "properties": names}
            body["limit"] = SEARCH_PAGE
            if after:
                body["after"] = after
            answer = await self.client.post_json(path, body, search=True) or {}
            results.extend(r for r in answer.get("results") or [] if isinstance(r, dict))
            after = ((answer.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return results

    async def _read_contacts(self, contact_ids: list[str]) -> dict[str, Contact]:
        """Contacts by id (no search lag); a merged id answers with the surviving contact."""
        found: dict[str, Contact] = {}
        for start in range(0, len(contact_ids), BATCH_LIMIT):
            chunk = contact_ids[start : start + BATCH_LIMIT]
            body = {"properties": CONTACT_READ, "inputs": [{"id": c} for c in chunk]}
            try:
                answer = await self.client.post_json(f"{CONTACTS}/batch/read", body) or {}
            except HubSpotError as error:
                if error.status_code == 404:
                    continue
                raise
            for record in answer.get("results") or []:
                contact = Contact.of(record)
                merged = contact.get("hs_merged_object_ids").split(";")
                for requested in chunk:
                    if requested == contact.id or requested in merged:
                        found[requested] = contact
        return found

    # --- 2. new callers --------------------------------------------------------------------

    def _plan_new_contacts(self) -> None:
        components = _Components()
        unmatched = [item for item in self.items if item.contact_id is None]
        for item in unmatched:
            components.union(item.keys)
        by_component: dict[Key, list[Item]] = {}
        for item in unmatched:
            by_component.setdefault(components.find(item.keys[0]), []).append(item)
        for items in by_component.values():
            plan = NewContact(
                items=items,
                phone=next((i.phone for i in items if i.phone), None),
                email=next((i.email for i in items if i.email), None),
                name=next((i.event.caller.name for i in items if i.event.caller.name), None),
            )
            firstname, lastname = split_name(plan.name)
            identity_values = {
                "firstname": firstname,
                "lastname": lastname,
                "phone": plan.phone,
                "email": plan.email,
                "lead_source": self._lead_source(),
            }
            plan.properties = {k: v for k, v in identity_values.items() if v}
            ai, plan.owners = _owners(items, self.state, self.outcomes)
            plan.properties.update(ai)
            self.new_contacts.append(plan)

    def _lead_source(self) -> str | None:
        use = self.state.use("lead_source")
        if use is None:
            return None
        if use.kind == OPTION:
            return properties.LEAD_SOURCE_VALUE
        return self.services.settings.lead_source_label if use.kind == STRING else None

    async def _create_contacts(self) -> None:
        pending = [p for p in self.new_contacts if p.properties]
        while pending:
            inputs = [WriteInput({"properties": dict(p.properties)}, p) for p in pending]
            sent = await self._send(f"{CONTACTS}/batch/create", inputs)
            # Match what was sent: a plan whose email HubSpot refused went out without it.
            by_email = {p.email: p for p in pending if p.email and "email" in p.properties}
            by_phone = {p.phone: p for p in pending if p.phone and "email" not in p.properties}
            created: list[NewContact] = []
            for record in sent.results:
                contact = Contact.of(record)
                plan = by_email.get(identity.normalize_email(contact.get("email") or None) or "")
                if plan is None:
                    plan = by_phone.get(contact.get("phone"))
                if plan is not None:
                    self._adopt(plan, contact.id, created=True)
                    created.append(plan)
            await self._index_created(created)
            retry: list[NewContact] = []
            for write, error in sent.rejected:
                plan = write.ref
                assert isinstance(plan, NewContact)
                if isinstance(error, HubSpotConflict) and error.existing_id:
                    # A contact with this email appeared meanwhile (a person, or search lag).
                    self._adopt(plan, error.existing_id, created=False)
                elif self._drop_rejected(
                    plan.properties, plan.owners, plan.items, error, creating=True
                ):
                    retry.append(plan)
                else:
                    for item in plan.items:
                        item.failure = reason_of(error)
            pending = retry

    def _adopt(self, plan: NewContact, contact_id: str, *, created: bool) -> None:
        plan.contact_id = contact_id
        if created and "sync_error_message" in plan.properties:
            self.errors_written.add(contact_id)
        if not created:
            self.adopted.add(contact_id)
        for item in plan.items:
            item.contact_id = contact_id
            item.created_contact = created
        for key in {key for item in plan.items for key in item.keys}:
            self.match.setdefault(key, contact_id)

    def _drop_rejected(
        self,
        values: dict[str, str],
        owners: dict[str, list[Item]],
        items: list[Item],
        error: HubSpotError,
        *,
        creating: bool = False,
    ) -> bool:
        """Take the values HubSpot refused out of a single record; fail the events behind them."""
        # Answers whether the record is worth sending again: it keeps a caller (a new
        # contact) or something to say (an update, which then carries the reason).
        named = {p.name for p in property_errors(error)} & set(values)
        if not named:
            return False
        reason = reason_of(error)
        for name in named:
            values.pop(name, None)
            for item in _behind(name, owners, items):
                item.failure = reason
        if self.state.use("sync_error_message") is not None:
            values["sync_error_message"] = reason[:MAX_TEXT]
        if creating:
            return "email" in values or "phone" in values
        return bool(values)

    async def _read_conflicted(self) -> None:
        """Contacts a create ran into (409): read them so they are updated like any other."""
        wanted = sorted(
            {
                item.contact_id
                for item in self.items
                if item.contact_id
                and item.contact_id not in self.contacts
                and not item.created_contact
            }
        )
        if wanted:
            read = await self._read_contacts(wanted)
            for requested, contact in read.items():
                self.contacts[requested] = contact
            for item in self.items:
                if item.contact_id in wanted and item.contact_id not in read and item.ok:
                    item.retry = ContactGone("the contact HubSpot named could not be read")

    async def _index_created(self, plans: list[NewContact]) -> None:
        """Index the contacts a create just made, before anything else can fail the batch."""
        # A step running alongside (known contacts' updates) may fail the attempt, and its
        # quick retry would look for these callers where HubSpot's search does not show
        # new contacts for seconds yet: it would create them again. The index shows them
        # at once.
        identities = {plan.contact_id: _sent_identity(plan) for plan in plans if plan.contact_id}
        if not identities:
            return
        try:
            await self._write_index(identities, as_of=utcnow())
        except Exception as error:
            raise UnrecordedWrite(
                f"{len(identities)} new contacts were created but could not be indexed"
            ) from error
        self._indexed_created.update(identities)

    async def _remember_identities(self) -> None:
        """Point the index at every contact resolved or created, committed at once."""
        as_of = utcnow()
        per_contact: dict[str, tuple[set[str], set[str]]] = {}
        for plan in self.new_contacts:
            if (
                plan.contact_id
                and plan.contact_id not in self.contacts
                and plan.contact_id not in self._indexed_created
            ):
                per_contact[plan.contact_id] = _sent_identity(plan)
        for contact_id, contact in self.contacts.items():
            # A value two contacts share (duplicates a person made) stays with the contact
            # the batch matched it to, so the next call goes to the same one.
            keys = set(contact.keys(self.region))
            # And what this batch fills in, but not a caller's other email or phone: the
            # contact does not hold it, so HubSpot's search would not find the contact by
            # it, and neither may the index (a second person sharing the phone).
            fills = self._fills(contact, [i for i in self.items if i.contact_id == contact_id])
            if fills.get("email"):
                keys.add((identity.EMAIL, fills["email"]))
            if fills.get("phone"):
                keys.add((identity.PHONE, fills["phone"]))
            keys = {k for k in keys if self.match.get(k) in (None, contact_id)}
            per_contact[contact_id] = (
                {v for k, v in keys if k == identity.PHONE},
                {v for k, v in keys if k == identity.EMAIL},
            )
        if per_contact:
            await self._write_index(per_contact, as_of=as_of)

    async def _write_index(
        self, per_contact: dict[str, tuple[set[str], set[str]]], *, as_of: datetime
    ) -> None:
        async with transaction(self.services.sessions) as session:
            await identity.set_many(
                self.portal_id,
                {
                    c: (sorted(phones), sorted(emails))
                    for c, (phones, emails) in per_contact.items()
                },
                session=session,
                cipher=self.services.cipher,
                as_of=as_of,
            )

    # --- 3. existing contacts ---------------------------------------------------------------

    async def _update_contacts(self, contact_ids: set[str]) -> None:
        """Write the batch's values to these existing contacts (those read or adopted)."""
        plans: list[WriteInput] = []
        newest = await self._newest_synced(
            [c for c in self.contacts if c in contact_ids], [i.id for i in self.items]
        )
        for contact_id, contact in self.contacts.items():
            items = [i for i in self.items if i.contact_id == contact_id and i.ok]
            if contact_id not in contact_ids or not items:
                continue
            # An event retried after a newer one synced fills gaps but does not bring its
            # older AI values back over the newer ones.
            synced_up_to = newest.get(contact_id)
            current = [
                i for i in items if synced_up_to is None or i.event.occurred_at >= synced_up_to
            ]
            values, owners = _owners(current, self.state, self.outcomes)
            values.update(self._fills(contact, items))
            if self.state.use("sync_error_message") is not None:
                values["sync_error_message"] = ""
            if values:
                plans.append(WriteInput({"id": contact_id, "properties": values}, (items, owners)))
        while plans:
            sent = await self._send(f"{CONTACTS}/batch/update", plans)
            for contact_id in sent.missing_ids:
                for item in self.items:
                    if item.contact_id == contact_id and item.ok:
                        item.retry = ContactGone("the contact was deleted while syncing")
            retry: list[WriteInput] = []
            for write, error in sent.rejected:
                items, owners = write.ref
                values = write.body["properties"]
                if isinstance(error, HubSpotConflict) and "email" in values:
                    values.pop("email")  # the email belongs to another contact
                    retry.append(write)
                elif error.status_code == 404:
                    for item in items:
                        item.retry = ContactGone("the contact was deleted while syncing")
                elif self._drop_rejected(values, owners, items, error):
                    self.errors_written.add(write.body["id"])
                    retry.append(write)
                else:
                    for item in items:
                        item.failure = reason_of(error)
            plans = retry

    async def _name_contacts_on_events(self) -> None:
        """Record each event's contact on its row, still in progress."""
        # Before the portal's next batch may start: that batch counts them among its
        # contacts' newest events (`_newest_synced`), so an older event in it does not
        # overwrite this batch's values.
        rows = [
            {"b_id": item.id, "b_contact_id": item.contact_id}
            for item in self.items
            if item.ok and item.contact_id
        ]
        if not rows:
            return
        statement = (
            sa.update(_EVENTS)
            .where(_EVENTS.c.id == sa.bindparam("b_id"))
            .values(contact_id=sa.bindparam("b_contact_id"))
        )
        async with transaction(self.services.sessions) as session:
            await (await session.connection()).execute(statement, rows)

    async def _newest_synced(
        self, contact_ids: list[str], batch_event_ids: list[int]
    ) -> dict[str, datetime]:
        """When each contact's newest event outside this batch happened."""
        # Among those synced (and so whose values the contact was given; a text's note may
        # still be queued), and those of a batch still in flight that has written its
        # contacts.
        if not contact_ids:
            return {}
        async with self.services.sessions() as session:
            rows = await session.execute(
                sa.select(col(InboxEvent.contact_id), sa.func.max(col(InboxEvent.occurred_at)))
                .where(
                    col(InboxEvent.portal_id) == self.portal_id,
                    col(InboxEvent.contact_id).in_(contact_ids),
                    col(InboxEvent.source) == EventSource.receptionist,
                    col(InboxEvent.status).in_([EventStatus.done, EventStatus.in_progress]),
                    col(InboxEvent.id).not_in(batch_event_ids),
                )
                .group_by(col(InboxEvent.contact_id))
            )
            return {contact: when for contact, when in rows.all() if contact and when}

    def _fills(self, contact: Contact, items: list[Item]) -> dict[str, str]:
        """Identity values for the contact's empty fields only: a person's edits stay."""
        fills: dict[str, str] = {}
        name = next((i.event.caller.name for i in items if i.event.caller.name), None)
        firstname, lastname = split_name(name)
        if firstname and not contact.get("firstname"):
            fills["firstname"] = firstname
        if lastname and not contact.get("lastname"):
            fills["lastname"] = lastname
        own = contact.keys(self.region)
        email = next(
            (i.email for i in items if i.email and self.match.get((identity.EMAIL, i.email))
             in (None, contact.id)),
            None,
        )  # fmt: skip
        if email and not contact.get("email"):
            fills["email"] = email
        phone = next(
            (i.phone for i in items if i.phone and self.match.get((identity.PHONE, i.phone))
             in (None, contact.id)),
            None,
        )  # fmt: skip
        if phone and not contact.get("phone") and (identity.PHONE, phone) not in own:
            fills["phone"] = phone
        lead_source = self._lead_source()
        if lead_source and not contact.get("lead_source"):
            fills["lead_source"] = lead_source
        return fills

    # --- writing with splits ------------------------------------------------------------------

    async def _send(self, path: str, inputs: list[WriteInput]) -> Sent:
        """Batch writes of up to 100 inputs; a rejected batch is split down to the bad record."""
        sent = Sent()
        for start in range(0, len(inputs), BATCH_LIMIT):
            await self._send_chunk(path, inputs[start : start + BATCH_LIMIT], sent)
        return sent

    async def _send_chunk(
        self,
        path: str,
        chunk: list[WriteInput],
        sent: Sent,
        resent: frozenset[str] = frozenset(),
    ) -> None:
        """`resent`: the dropdowns this chunk was already sent again for, after their repair."""
        if not chunk:
            return
        try:
            answer = await self.client.post_json(path, {"inputs": [w.body for w in chunk]}) or {}
        except (HubSpotValidationError, HubSpotConflict) as error:
            fixed = await self._fix_portal_properties(error, chunk, resent)
            if fixed is not None:
                await self._send_chunk(path, chunk, sent, resent | fixed)
            elif len(chunk) > 1:
                middle = len(chunk) // 2
                await self._send_chunk(path, chunk[:middle], sent, resent)
                await self._send_chunk(path, chunk[middle:], sent, resent)
            else:
                log.info(
                    "%s",
                    reason_of(error),
                    extra={"portal_id": self.portal_id, "correlation_id": error.correlation_id},
                )
                sent.rejected.append((chunk[0], error))
            return
        except HubSpotError as error:
            if error.status_code == 404 and len(chunk) == 1 and "id" in chunk[0].body:
                sent.missing_ids.add(str(chunk[0].body["id"]))
                return
            raise
        sent.results.extend(r for r in answer.get("results") or [] if isinstance(r, dict))
        for problem in answer.get("errors") or []:
            ids = ((problem or {}).get("context") or {}).get("ids") or []
            sent.missing_ids.update(str(i) for i in ids)

    async def _fix_portal_properties(
        self, error: HubSpotError, chunk: list[WriteInput], resent: frozenset[str]
    ) -> frozenset[str] | None:
        """A refusal caused by the portal, not the record: adapt the chunk to send it again."""
        # Answers None when there is nothing to adapt, else the dropdowns whose repair
        # (and the deleted properties whose recreation) the chunk is sent again for.
        # Creates and updates run together, so both can be refused for the same removed
        # option: the one that comes second finds it repaired and is sent again with the
        # repaired options (once; a value refused after that is the record's).
        async with self._fixing:
            return await self._fix_portal_properties_alone(error, chunk, resent)

    async def _fix_portal_properties_alone(
        self, error: HubSpotError, chunk: list[WriteInput], resent: frozenset[str]
    ) -> frozenset[str] | None:
        named = property_errors(error)
        gone = {
            p.name
            for p in named
            if p.code == "PROPERTY_DOESNT_EXIST" and p.name in properties.PROPERTY_NAMES
        }
        # Deleted since the last property check: created again at once (once per batch,
        # where the portal lets Hubline), so this batch's values are not lost. A chunk
        # is sent again once for a property recreated; refused again, it is left out.
        if properties.SCHEMA_WRITE_SCOPE in self.scopes and gone - self._recreating:
            fresh = gone - self._recreating
            self._recreating |= fresh
            made = await properties.recreate(self.services, self.client, self.state, fresh)
            self._recreated |= made
            self.problems -= {properties.problem_code(name) for name in made}
            if "call_outcome" in made:
                # Made with the default outcomes: add back this batch's own.
                self._repaired.add("call_outcome")
                await self._repair_options("call_outcome")
        back = {name for name in gone & self._recreated if name not in resent}
        gone -= back
        for name in gone:
            await properties.mark_unusable(
                self.services,
                self.portal_id,
                self.state,
                name,
                f"HubSpot says the contact property {name!r} does not exist; Hubline leaves it "
                "out until the next property check recreates it.",
            )
            self.problems.add(properties.problem_code(name))
        refused_options = {
            p.name for p in named if p.code == "INVALID_OPTION" and p.name in REPAIRABLE_OPTIONS
        }
        stale = frozenset(name for name in refused_options if name not in resent)
        for name in sorted(stale - self._repaired):
            self._repaired.add(name)  # once per batch
            await self._repair_options(name)
        # Any other refusal of a value Hubline built for its own property: an admin may
        # have changed the property's type since the last check. Read again (once per
        # batch), such a property is left out and reported, and the rest sent again, as
        # DESIGN.md has it (the callers' data is not at fault); one still writable leaves
        # the refusal to the record. Creates and updates go out together, their bodies
        # built before: the second refused finds the property already found changed.
        owned = {
            p.name
            for p in named
            if p.name in properties.PROPERTY_NAMES
            and p.code != "PROPERTY_DOESNT_EXIST"
            and p.name not in refused_options
        }
        for name in sorted(owned - self._rechecked):
            self._rechecked.add(name)
            if await properties.recheck_type(self.services, self.client, self.state, name):
                self.problems.add(properties.problem_code(name))
        changed = {name for name in owned - resent if self.state.use(name) is None}
        if not gone and not stale and not back and not changed:
            return None
        for values in [w.body.get("properties") or {} for w in chunk] + [
            p.properties for p in self.new_contacts
        ]:
            self._drop_unwritable(values, gone | changed)
        return stale | back | frozenset(changed)

    async def _repair_options(self, name: str) -> None:
        """Read a dropdown's options again and add back those Hubline writes."""
        if name == "call_outcome":
            use = self.state.use("call_outcome")
            if use is not None:
                use.options = []  # forget the cache: read the property again
            await self._prepare_outcomes()
        elif name == "lead_source":
            await properties.ensure_lead_source_option(
                self.services, self.client, self.state, self.problems
            )

    def _drop_unwritable(self, values: dict[str, Any], gone: set[str]) -> None:
        """Take out of a record what the portal cannot take (as far as Hubline now knows)."""
        for name in gone:
            values.pop(name, None)
        if "call_outcome" in values and values["call_outcome"] not in self.outcomes:
            values.pop("call_outcome")
        if "lead_source" in values and self._lead_source() is None:
            values.pop("lead_source")

    # --- 4. engagements ---------------------------------------------------------------------

    async def _engagements(self) -> None:
        # An event HubSpot refused part of the contact's data for still has its call or
        # note logged on the contact: it fails with the reason (DESIGN.md), but what the
        # caller said is in the CRM (a refused email would keep every later call of theirs
        # out of it otherwise). Recorded at once, so retrying the event makes it no twice.
        todo = [i for i in self.items if i.retry is None and i.contact_id]
        if not todo:
            return
        try:
            await self._engagements_of(todo)
        finally:
            await self._record_made_for_failed()

    async def _engagements_of(self, todo: list[Item]) -> None:
        async with self.services.sessions() as session:
            rows = await session.execute(
                sa.select(EngagementRecord).where(
                    col(EngagementRecord.event_id).in_([i.id for i in todo])
                )
            )
            records = {row.event_id: row for row in rows.scalars()}
        uncertain: list[tuple[Item, datetime]] = []
        create: list[Item] = []
        for item in todo:
            record = records.get(item.id)
            if record is not None and record.engagement_id:
                item.engagement_id = record.engagement_id
            elif record is not None:
                item.intended_for = record.contact_id or None
                uncertain.append((item, record.created_at))
            elif self.notes_later and item.object_type == "notes" and item.ok:
                item.note_later = True
            else:
                create.append(item)
        if uncertain:
            found = await self._find_made(uncertain)
            for item, _ in uncertain:
                if item.id in found:
                    item.engagement_id = found[item.id]
                else:
                    create.append(item)
        if not create:
            return
        await self._write_intents(create)
        kinds = [
            (object_type, items)
            for object_type in ("calls", "notes")
            if (items := [i for i in create if i.object_type == object_type])
        ]
        # Calls and notes are independent writes: both go out at once (an engagement one
        # made before the other failed is found through its intent on the retry).
        answers = await _together(
            *(self._create_engagements_settled(object_type, items) for object_type, items in kinds)
        )
        rejected = [item for answer in answers for item in answer]
        if rejected:
            await self._forget_intents(rejected)

    async def _create_engagements_settled(self, object_type: str, items: list[Item]) -> list[Item]:
        """Create engagements, settling any answer that leaves open whether HubSpot made them."""
        # After such an answer, look at the contacts' associations (current at once,
        # unlike search) and create only what is missing, so a flaky HubSpot does not cost
        # the whole attempt.
        for round_number in range(1, AMBIGUOUS_CREATE_ROUNDS + 1):
            try:
                return await self._create_engagements(object_type, items)
            except HubSpotError as error:
                if not error.ambiguous or round_number == AMBIGUOUS_CREATE_ROUNDS:
                    raise
            found = await self._find_by_associations(items)
            for item in items:
                if item.id in found:
                    item.engagement_id = found[item.id]
            items = [item for item in items if item.engagement_id is None]
            if not items:
                break
        return []

    def _engagement_input(self, item: Item) -> dict[str, Any]:
        event = item.event
        values: dict[str, Any] = {"hs_timestamp": stamp(event.occurred_at)}
        if item.object_type == "calls":
            values |= {
                "hs_call_title": CALL_TITLE,
                "hs_call_body": engagement_body(None, event.summary, event.transcript),
                "hs_call_direction": "INBOUND",
                "hs_call_status": "COMPLETED",
            }
            if event.duration_seconds is not None:
                values["hs_call_duration"] = str(round(event.duration_seconds * 1000))
            if item.phone:
                values["hs_call_from_number"] = item.phone
            # Checked again here: an event stored by an older Hubline may hold an http link,
            # which HubSpot would refuse the whole call for.
            if event.recording_url and is_https_address(event.recording_url):
                values["hs_call_recording_url"] = event.recording_url
        else:
            values["hs_note_body"] = engagement_body(
                item.note_heading, event.summary, event.transcript
            )
        association = {
            "to": {"id": item.contact_id},
            "types": [
                {
                    "associationCategory": "HUBSPOT_DEFINED",
                    "associationTypeId": ASSOCIATION_TYPES[item.object_type],
                }
            ],
        }
        return {"properties": values, "associations": [association]}

    async def _create_engagements(self, object_type: str, items: list[Item]) -> list[Item]:
        inputs = [WriteInput(self._engagement_input(i), i) for i in items]
        sent = await self._send(f"/crm/v3/objects/{object_type}/batch/create", inputs)
        # HubSpot does not answer a batch in input order: match results by what was sent.
        waiting: dict[tuple[int | None, str], list[Item]] = defaultdict(list)
        for write in inputs:
            values = write.body["properties"]
            key = (millis(values["hs_timestamp"]), values.get("hs_call_from_number") or "")
            waiting[key].append(write.ref)
        rejected_items = {id(write.ref) for write, _ in sent.rejected}
        for record in sent.results:
            values = record.get("properties") or {}
            key = (millis(values.get("hs_timestamp")), values.get("hs_call_from_number") or "")
            queue = waiting.get(key) or next(
                (q for k, q in waiting.items() if k[0] == key[0] and q), None
            )
            if queue:
                queue.pop(0).engagement_id = str(record.get("id"))
        rejected: list[Item] = []
        # HubSpot refuses an engagement whose contact was deleted (or merged into another)
        # since this batch found it: the contact is at fault, not the record. The event is
        # tried again, and finds or creates its caller as a new event would.
        present = await self._read_contacts(
            sorted({w.ref.contact_id for w, _ in sent.rejected if w.ref.contact_id})
        )
        for write, error in sent.rejected:
            item = write.ref
            contact = present.get(item.contact_id or "")
            if item.contact_id and (contact is None or contact.id != item.contact_id):
                item.retry = ContactGone("the contact was deleted while syncing")
            else:
                item.failure = reason_of(error)
                if item.contact_id:
                    self.contact_errors[item.contact_id] = item.failure
            rejected.append(item)
        for item in items:
            if item.engagement_id is None and id(item) not in rejected_items:
                # Sent and accepted, but not recognisable in the answer: the retry finds it.
                item.retry = HandlerError("HubSpot's answer did not show the engagement made")
        return rejected

    async def _write_intents(self, items: list[Item]) -> None:
        """Commit that an engagement is about to be made, so a retry knows to look first."""
        now = utcnow()
        rows = [
            {
                "portal_id": self.portal_id,
                "event_id": item.id,
                "object_type": item.object_type,
                "engagement_id": "",
                "contact_id": item.contact_id or "",
                "created_at": now,
            }
            for item in sorted(items, key=lambda i: i.id)
        ]
        insert = pg_insert if self._postgres else sqlite_insert
        statement = insert(_ENGAGEMENTS)
        statement = statement.on_conflict_do_update(
            index_elements=["event_id"],
            set_={
                "contact_id": statement.excluded.contact_id,
                "created_at": statement.excluded.created_at,
            },
            where=_ENGAGEMENTS.c.engagement_id == "",
        )
        async with transaction(self.services.sessions) as session:
            await (await session.connection()).execute(statement, rows)

    async def _record_made_for_failed(self) -> None:
        """Record the engagements of failed events now: their outcome carries no write."""
        made = [i for i in self.items if i.failure and i.retry is None and i.engagement_id]
        if made:
            record = _record_engagements(self.portal_id, made, self._postgres, self.services.cipher)
            async with transaction(self.services.sessions) as session:
                await record(session)

    async def _forget_intents(self, items: list[Item]) -> None:
        async with transaction(self.services.sessions) as session:
            await session.execute(
                sa.delete(EngagementRecord)
                .where(
                    col(EngagementRecord.event_id).in_([i.id for i in items]),
                    col(EngagementRecord.engagement_id) == "",
                )
                .execution_options(synchronize_session=False)
            )

    @property
    def _postgres(self) -> bool:
        return not self.services.settings.is_sqlite

    async def _find_made(self, uncertain: list[tuple[Item, datetime]]) -> dict[int, str]:
        """Engagements HubSpot already made for events whose earlier attempt did not finish."""
        lag_before = utcnow() - SEARCH_LAG
        recent = [item for item, intended in uncertain if intended > lag_before]
        older = [item for item, intended in uncertain if intended <= lag_before]
        found: dict[int, str] = {}
        if recent:
            found.update(await self._find_by_associations(recent))
        if older:
            found.update(await self._find_by_search(older))
        if found:
            log.info(
                "found %d engagements made by an earlier attempt",
                len(found),
                extra={"portal_id": self.portal_id},
            )
        return found

    async def _made_for_other_events(
        self, engagement_ids: Iterable[str], items: list[Item]
    ) -> set[str]:
        """Of these engagements, those recorded as made for events other than `items`."""
        # What tells an earlier attempt's engagement (the caller's contact, the time to
        # the second, Hubline's title or heading) fits another message of the caller's
        # sent in the same second too: taken for this one, this one's would never be made.
        wanted = sorted(set(engagement_ids))
        ours = {item.id for item in items}
        others: set[str] = set()
        async with self.services.sessions() as session:
            for start in range(0, len(wanted), _ENGAGEMENTS_PER_QUERY):
                rows = await session.execute(
                    sa.select(col(EngagementRecord.engagement_id), col(EngagementRecord.event_id))
                    .where(col(EngagementRecord.portal_id) == self.portal_id)
                    .where(
                        col(EngagementRecord.engagement_id).in_(
                            wanted[start : start + _ENGAGEMENTS_PER_QUERY]
                        )
                    )
                )
                others.update(engagement for engagement, event in rows if event not in ours)
        return others

    @staticmethod
    def _is_ours(item: Item, values: dict[str, Any]) -> bool:
        if millis(values.get("hs_timestamp")) != item.timestamp_ms:
            return False
        if item.object_type == "calls":
            return values.get("hs_call_title") == CALL_TITLE
        return item.note_heading in str(values.get("hs_note_body") or "")

    @staticmethod
    def _read_names(object_type: str) -> list[str]:
        if object_type == "calls":
            return ["hs_timestamp", "hs_call_title"]
        return ["hs_timestamp", "hs_note_body"]

    async def _find_by_associations(self, items: list[Item]) -> dict[int, str]:
        found: dict[int, str] = {}
        for object_type in ("calls", "notes"):
            wanted = [i for i in items if i.object_type == object_type]
            owned: dict[str, str] = {}  # engagement id → contact id
            contact_ids = sorted({i.made_for for i in wanted if i.made_for})
            associated = await self._associated_many(contact_ids, object_type)
            for contact_id, engagement_ids in associated.items():
                for engagement_id in engagement_ids:
                    owned[engagement_id] = contact_id
            records = await self._read_objects(object_type, sorted(owned))
            claimed = await self._made_for_other_events(records, wanted)
            for item in wanted:
                for engagement_id, values in sorted(records.items(), key=lambda r: int(r[0])):
                    if (
                        engagement_id not in claimed
                        and owned.get(engagement_id) == item.made_for
                        and self._is_ours(item, values)
                    ):
                        found[item.id] = engagement_id
                        claimed.add(engagement_id)
                        break
        return found

    async def _associated_many(
        self, contact_ids: list[str], object_type: str
    ) -> dict[str, list[str]]:
        """Each contact's associated engagements of `object_type`, a thousand contacts a request."""
        # A lost answer on a full batch is settled in one request, not a hundred. A
        # contact is settled by its last page of results or by HubSpot's "no associations"
        # entry; one the answer leaves unsettled any other way is read on its own, since
        # taking it for "none" could make its engagement twice.
        found: dict[str, list[str]] = {contact_id: [] for contact_id in contact_ids}
        settled: set[str] = set()
        pending: list[dict[str, str]] = [{"id": contact_id} for contact_id in contact_ids]
        while pending:
            following: list[dict[str, str]] = []
            for start in range(0, len(pending), ASSOCIATION_READ_LIMIT):
                answer = (
                    await self.client.post_json(
                        f"/crm/v4/associations/contacts/{object_type}/batch/read",
                        {"inputs": pending[start : start + ASSOCIATION_READ_LIMIT]},
                    )
                    or {}
                )
                for result in answer.get("results") or []:
                    contact_id = str((result.get("from") or {}).get("id"))
                    if contact_id not in found:
                        continue
                    found[contact_id] += [str(t.get("toObjectId")) for t in result.get("to") or []]
                    after = ((result.get("paging") or {}).get("next") or {}).get("after")
                    if after:
                        following.append({"id": contact_id, "after": str(after)})
                    else:
                        settled.add(contact_id)
                for error in answer.get("errors") or []:
                    if error.get("subCategory") == NO_ASSOCIATIONS:
                        named = (error.get("context") or {}).get("fromObjectId") or []
                        settled.update(str(i) for i in named if str(i) in found)
            pending = following
        for contact_id in contact_ids:
            if contact_id not in settled:
                found[contact_id] = await self._associated(contact_id, object_type)
        return found

    async def _associated(self, contact_id: str, object_type: str) -> list[str]:
        ids: list[str] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if after:
                params["after"] = after
            answer = (
                await self.client.get_json(
                    f"/crm/v4/objects/contacts/{contact_id}/associations/{object_type}", params
                )
                or {}
            )
            ids += [str(r.get("toObjectId")) for r in answer.get("results") or []]
            after = ((answer.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return ids

    async def _read_objects(
        self, object_type: str, object_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(object_ids), BATCH_LIMIT):
            body = {
                "properties": self._read_names(object_type),
                "inputs": [{"id": i} for i in object_ids[start : start + BATCH_LIMIT]],
            }
            try:
                answer = await self.client.post_json(
                    f"/crm/v3/objects/{object_type}/batch/read", body
                )
            except HubSpotError as error:
                if error.status_code == 404:
                    continue
                raise
            for record in (answer or {}).get("results") or []:
                found[str(record.get("id"))] = record.get("properties") or {}
        return found

    async def _find_by_search(self, items: list[Item]) -> dict[int, str]:
        """One filter group per event: its contact, its exact timestamp, Hubline's title."""
        found: dict[int, str] = {}
        for object_type in ("calls", "notes"):
            wanted = [i for i in items if i.object_type == object_type]
            # Within one request no two groups share a timestamp, so a hit names its event.
            requests: list[list[Item]] = []
            for item in wanted:
                slot = next(
                    (
                        r
                        for r in requests
                        if len(r) < MAX_FILTER_GROUPS
                        and all(o.timestamp_ms != item.timestamp_ms for o in r)
                    ),
                    None,
                )
                if slot is None:
                    requests.append([item])
                else:
                    slot.append(item)
            # Two events of one second go to different requests, and each may find both
            # engagements: one taken by an event is never another's.
            claimed: set[str] = set()
            for group_items in requests:
                groups = []
                for item in group_items:
                    filters = [
                        {
                            "propertyName": "associations.contact",
                            "operator": "EQ",
                            "value": item.made_for,
                        },
                        {
                            "propertyName": "hs_timestamp",
                            "operator": "EQ",
                            "value": str(item.timestamp_ms),
                        },
                    ]
                    if object_type == "calls":
                        filters.append(
                            {"propertyName": "hs_call_title", "operator": "EQ", "value": CALL_TITLE}
                        )
                    groups.append({"filters": filters})
                results = await self._search_all(
                    f"/crm/v3/objects/{object_type}/search", groups, self._read_names(object_type)
                )
                claimed |= await self._made_for_other_events(
                    [str(r.get("id")) for r in results], group_items
                )
                for item in group_items:
                    hit = next(
                        (
                            str(r.get("id"))
                            for r in sorted(results, key=lambda r: int(str(r.get("id"))))
                            if str(r.get("id")) not in claimed
                            and self._is_ours(item, r.get("properties") or {})
                        ),
                        None,
                    )
                    if hit is not None:
                        found[item.id] = hit
                        claimed.add(hit)
        return found

    # --- 5. campaigns and errors ---------------------------------------------------------------

    async def _campaigns(self) -> None:
        by_event: dict[int, Item] = {}
        attendances: list[campaigns.Attendance] = []
        for i in self.items:
            if i.synced and i.contact_id and i.event.campaign_id:
                by_event[i.id] = i
                attendances.append(
                    campaigns.Attendance(
                        i.event.campaign_id, i.contact_id, i.event.occurred_at, i.id
                    )
                )
        recording = await campaigns.record_attendance(
            self.services,
            self.client,
            scopes=self.scopes,
            known_problems=self.problems,
            attendances=attendances,
        )
        # The event's contact and engagement are in the CRM: it is done, and what HubSpot
        # could not take now is queued with it (retrying the event would rewrite the
        # contact with values a newer event may have replaced).
        for attendance in recording.later:
            assert attendance.event_id is not None
            by_event[attendance.event_id].attendance_later = attendance

    async def _write_contact_errors(self) -> None:
        """Say on each contact why one of its events failed (when it was not said already)."""
        for item in self.items:
            if item.failure and item.contact_id and item.contact_id not in self.errors_written:
                self.contact_errors.setdefault(item.contact_id, item.failure)
        if not self.contact_errors or self.state.use("sync_error_message") is None:
            return
        inputs = [
            {"id": contact_id, "properties": {"sync_error_message": reason[:MAX_TEXT]}}
            for contact_id, reason in self.contact_errors.items()
            if contact_id not in self.errors_written
        ]
        for start in range(0, len(inputs), BATCH_LIMIT):
            try:
                await self.client.post_json(
                    f"{CONTACTS}/batch/update", {"inputs": inputs[start : start + BATCH_LIMIT]}
                )
            except HubSpotError as error:
                # The events carry the reason anyway; this is a courtesy on the contact.
                log.warning(
                    "writing sync_error_message failed: %s",
                    reason_of(error),
                    extra={"portal_id": self.portal_id, "correlation_id": error.correlation_id},
                )

    # --- outcomes -------------------------------------------------------------------------------

    def _outcome(self, item: Item, write: Write | None) -> Outcome:
        if item.retry is not None:
            return item.retry
        if item.failure is not None:
            return PermanentError(item.failure)
        if not item.synced:
            return HandlerError("the event was not synced")  # retried
        result = {
            "contact_id": item.contact_id,
            "object_type": item.object_type,
            "engagement_id": item.engagement_id,
            "created_contact": item.created_contact,
        }
        if item.note_later:
            del result["engagement_id"]
            result["note"] = "queued"
        if item.attendance_later is not None:
            result["campaign_attendance"] = "queued"
        return Done(result=result, contact_id=item.contact_id, write=write)


# Rows of a batch go in as one statement with many parameter sets, on the table: the
# ORM's bulk-insert path costs more CPU than the database spends on them.
_ENGAGEMENTS: sa.Table = EngagementRecord.__table__  # type: ignore[attr-defined]
_EVENTS: sa.Table = InboxEvent.__table__  # type: ignore[attr-defined]


def _record_engagements(
    portal_id: int, items: list[Item], postgres: bool, cipher: TokenCipher
) -> Write:
    """One statement mapping a batch's synced events to their engagements."""
    # The attendances left for later are queued in the same transaction.
    later = [i.attendance_later for i in items if i.attendance_later is not None]
    notes = [_note_later(portal_id, i) for i in items if i.note_later]
    rows = [
        {
            "portal_id": portal_id,
            "event_id": item.id,
            "object_type": item.object_type,
            "engagement_id": item.engagement_id,
            "contact_id": item.contact_id,
        }
        for item in sorted(items, key=lambda i: i.id)
        if item.engagement_id
    ]

    async def write(session: AsyncSession) -> None:
        now = utcnow()
        insert = pg_insert if postgres else sqlite_insert
        statement = insert(_ENGAGEMENTS)
        statement = statement.on_conflict_do_update(
            index_elements=["event_id"],
            set_={
                name: statement.excluded[name]
                for name in ("object_type", "engagement_id", "contact_id")
            },
        )
        if rows:
            connection = await session.connection()
            await connection.execute(statement, [row | {"created_at": now} for row in rows])
        if later:
            await campaigns.try_later(portal_id, later, session=session, cipher=cipher)
        if notes:
            await enqueue_many(notes, session=session, cipher=cipher)

    return write


def _note_later(portal_id: int, item: Item) -> NewEvent:
    """The queued note of a synced text or chat: what it says and whose it is."""
    return NewEvent(
        portal_id=portal_id,
        source=EventSource.internal,
        type=NOTE_LATER,
        idempotency_key=f"{NOTE_LATER}:{item.id}",
        occurred_at=item.event.occurred_at,
        payload={
            "event_id": item.id,
            "contact_id": item.contact_id,
            "event": item.event.payload(),
        },
    )


@registry.handler(NOTE_LATER, batch_size=BATCH_LIMIT, fill_wait=NOTE_FILL_WAIT)
async def handle_notes_later(ctx: HandlerContext, views: list[EventView]) -> dict[int, Outcome]:
    """Write queued notes, a hundred to a request. Each note is recorded against its
    receptionist event, so the intents that keep engagements exactly-once apply as before."""
    outcomes: dict[int, Outcome] = {}
    items: dict[int, Item] = {}  # queued event id → the receptionist event's item
    for view in views:
        if not view.payload:
            outcomes[view.id] = Done(result={"skipped": "payload deleted"})
            continue
        try:
            event = ReceptionistEvent.model_validate(view.payload["event"])
            origin = replace(view, id=int(view.payload["event_id"]), type=event.type)
            contact_id = str(view.payload["contact_id"])
        except (KeyError, TypeError, ValueError, ValidationError):
            outcomes[view.id] = PermanentError("the stored event is not a queued note")
            continue
        items[view.id] = Item(origin, event, contact_id=contact_id)
    if items:
        sync = BatchSync(ctx.services, ctx.portal_id, list(items.values()))
        written = await sync.write_notes()
        # A note whose contact was deleted (or merged away) after its text synced goes to
        # the caller's contact as it is now, found or created as for a new event. Not on
        # the first attempt that finds it gone: if the deletion was a privacy deletion, its
        # webhook comes meanwhile and erases the note instead of the person coming back.
        orphans = [
            Item(item.view, item.event)
            for item in items.values()
            if isinstance(item.retry, ContactGone) and item.view.attempts > 1
        ]
        if orphans:
            written |= await BatchSync(ctx.services, ctx.portal_id, orphans).run()
        outcomes.update({queued: written[item.id] for queued, item in items.items()})
    return outcomes
