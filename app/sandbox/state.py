"""The sandbox's in-memory world: portals and their CRM data, tokens, traffic, webhooks, journal.

Everything runs on one event loop and no mutation awaits halfway, so no locks are needed.
Tests reach this object as `app.state.sandbox` and may read or change it directly.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from app.sandbox.config import SandboxConfig, SandboxPortal
from app.sandbox.limits import Fault, RollingWindow
from app.sandbox.properties import (
    OBJECT_TYPES,
    PropertyDef,
    PropertyGroup,
    default_groups,
    default_properties,
)

if TYPE_CHECKING:
    from app.sandbox.webhooks import WebhookDispatcher

# Association type ids HubSpot defines between engagements and contacts.
ASSOCIATION_TYPES: dict[tuple[str, str], int] = {
    ("calls", "contacts"): 194,
    ("contacts", "calls"): 193,
    ("notes", "contacts"): 202,
    ("contacts", "notes"): 201,
}
ASSOCIATION_LABELS = {
    194: "call_to_contact",
    193: "contact_to_call",
    202: "note_to_contact",
    201: "contact_to_note",
}

# First ids per object type, far apart so an id used for the wrong type is never found.
ID_BASES = {"contacts": 100_001, "calls": 20_000_001, "notes": 30_000_001}

UNINSTALL_EVENT_TYPE = "4-1916193"
INSTALL_EVENT_TYPE = "4-1909196"

# Subscription ids the sandbox app uses for its contact webhook subscriptions.
SUBSCRIPTION_IDS = {
    "contact.creation": 500_001,
    "contact.deletion": 500_002,
    "contact.merge": 500_003,
    "contact.privacyDeletion": 500_004,
    "contact.propertyChange": 500_100,
}


@dataclass(frozen=True)
class ChangeSource:
    """Who made a change, as webhook events report it."""

    change_source: str
    source_id: str


UI_SOURCE = ChangeSource("CRM_UI", "userId:1")


@dataclass
class CrmObject:
    """A contact, call or note."""

    id: str
    object_type: str
    properties: dict[str, str]
    created_at: float
    updated_at: float
    archived: bool = False
    archived_at: float | None = None


@dataclass
class IndexVersion:
    """What search sees of an object from `visible_at` on (None: the object is gone)."""

    visible_at: float
    properties: dict[str, str] | None


@dataclass(frozen=True)
class Association:
    """A directed association between two records."""

    from_type: str
    from_id: str
    to_type: str
    to_id: str
    type_id: int


@dataclass
class MarketingEvent:
    """A marketing event created by the app."""

    object_id: str
    external_event_id: str
    external_account_id: str
    event_name: str
    event_organizer: str
    created_at: float
    updated_at: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """HubSpot's JSON for a marketing event."""
        from app.sandbox.properties import iso

        return {
            **self.details,
            "id": self.object_id,
            "objectId": self.object_id,
            "externalEventId": self.external_event_id,
            "externalAccountId": self.external_account_id,
            "eventName": self.event_name,
            "eventOrganizer": self.event_organizer,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
        }


@dataclass
class Attendance:
    """A contact's subscriber state at a marketing event."""

    external_event_id: str
    external_account_id: str
    contact_id: str
    state: str
    interaction_at: int
    recorded_at: float

    def to_json(self) -> dict[str, Any]:
        """The attendance record as the inspection API shows it."""
        return {
            "externalEventId": self.external_event_id,
            "externalAccountId": self.external_account_id,
            "contactId": self.contact_id,
            "state": self.state,
            "interactionDateTime": self.interaction_at,
        }


@dataclass
class AuthCode:
    """An authorization code waiting to be exchanged."""

    code: str
    client_id: str
    redirect_uri: str
    portal_id: int
    scopes: list[str]
    code_challenge: str | None
    expires_at: float
    used: bool = False


@dataclass
class AccessToken:
    """An issued access token (portal or app-level)."""

    token: str
    portal_id: int | None
    scopes: list[str]
    issued_at: float
    expires_at: float
    refresh_token: str | None = None
    revoked: bool = False

    @property
    def is_app_token(self) -> bool:
        """Whether this is a client-credentials token, not bound to a portal."""
        return self.portal_id is None


@dataclass
class RefreshToken:
    """An issued refresh token."""

    token: str
    portal_id: int
    scopes: list[str]
    issued_at: float
    revoked: bool = False
    client_id: str = ""  # the app it was issued to; only that app's client may refresh it


@dataclass
class RequestRecord:
    """One API request, for the traffic view and the request counts."""

    at: float
    portal_id: int | None
    method: str
    path: str
    endpoint: str
    status: int
    duration_ms: float
    search: bool

    def to_json(self) -> dict[str, Any]:
        """The record as the inspection API shows it."""
        return {
            "at": self.at,
            "portal_id": self.portal_id,
            "method": self.method,
            "path": self.path,
            "endpoint": self.endpoint,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 2),
            "search": self.search,
        }


@dataclass
class JournalEntry:
    """An entry of the app's webhooks journal."""

    offset: str
    portal_id: int
    action: str
    event_type_id: str
    occurred_at: float
    app_id: int

    def to_json(self) -> dict[str, Any]:
        """The entry's JSON as downloaded from its short-lived URL."""
        return {
            "offset": self.offset,
            "portalId": self.portal_id,
            "appId": self.app_id,
            "subscriptionType": "APP_LIFECYCLE_EVENT",
            "eventTypeId": self.event_type_id,
            "action": self.action,
            "occurredAt": int(self.occurred_at * 1000),
        }


@dataclass
class WebhookDelivery:
    """One attempt to deliver a batch of webhook events."""

    batch_id: int
    attempt: int
    at: float
    event_count: int
    status: int | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        """The attempt as the inspection API shows it."""
        return {
            "batch_id": self.batch_id,
            "attempt": self.attempt,
            "at": self.at,
            "event_count": self.event_count,
            "status": self.status,
            "error": self.error,
        }


class PortalWorld:
    """One portal: its install status and CRM data."""

    def __init__(self, portal: SandboxPortal, now: float) -> None:
        self.portal = portal
        self.installed = False
        self.installed_at: float | None = None
        self.uninstalled_at: float | None = None
        self.granted_scopes: list[str] = []
        self.objects: dict[str, dict[str, CrmObject]] = {t: {} for t in OBJECT_TYPES}
        self.merged_into: dict[str, str] = {}  # merged contact id -> surviving contact id
        self.index: dict[str, dict[str, list[IndexVersion]]] = {t: {} for t in OBJECT_TYPES}
        self.properties: dict[str, dict[str, PropertyDef]] = {
            t: default_properties(t, now) for t in OBJECT_TYPES
        }
        self.groups: dict[str, dict[str, PropertyGroup]] = {
            t: default_groups(t) for t in OBJECT_TYPES
        }
        self.associations: set[Association] = set()
        # Lower-cased email → the contact written with it last. Every write passes through
        # `index_write`, which notes it; a lookup checks the contact still has that email,
        # so an email changed or a contact archived since needs no bookkeeping.
        self._email_owners: dict[str, str] = {}
        self.marketing_events: dict[tuple[str, str], MarketingEvent] = {}
        self.attendance: list[Attendance] = []
        self._ids = {t: itertools.count(base) for t, base in ID_BASES.items()}
        self._event_ids = itertools.count(40_000_001)

    @property
    def portal_id(self) -> int:
        """The portal's id (HubSpot's hub id)."""
        return self.portal.portal_id

    def next_id(self, object_type: str) -> str:
        """A fresh record id."""
        return str(next(self._ids[object_type]))

    def next_marketing_event_id(self) -> str:
        """A fresh marketing event object id."""
        return str(next(self._event_ids))

    def live(self, object_type: str) -> list[CrmObject]:
        """Records of a type that are not archived, oldest first."""
        return [o for o in self.objects[object_type].values() if not o.archived]

    def get(self, object_type: str, object_id: str) -> CrmObject | None:
        """A live record by id, following merges."""
        object_id = self.merged_into.get(object_id, object_id)
        obj = self.objects[object_type].get(object_id)
        return obj if obj is not None and not obj.archived else None

    def find_by_email(self, email: str) -> CrmObject | None:
        """The live contact with this email (compared lower-cased)."""
        wanted = email.strip().lower()
        owner = self._email_owners.get(wanted)
        contact = self.objects["contacts"].get(owner) if owner else None
        if contact is None or contact.archived:
            return None
        return contact if contact.properties.get("email", "").lower() == wanted else None

    def index_write(self, obj: CrmObject, now: float, lag: float) -> None:
        """Make search see the record's current state `lag` seconds from now."""
        if obj.object_type == "contacts" and not obj.archived:
            email = obj.properties.get("email", "").lower()
            if email:
                self._email_owners[email] = obj.id
        versions = self.index[obj.object_type].setdefault(obj.id, [])
        snapshot = None if obj.archived else dict(obj.properties)
        versions.append(IndexVersion(now + lag, snapshot))
        # Keep only the newest version already visible and those still pending.
        visible = [i for i, v in enumerate(versions) if v.visible_at <= now]
        if len(visible) > 1:
            del versions[: visible[-1]]

    def index_remove(self, object_type: str, object_id: str, now: float, lag: float) -> None:
        """Make search stop seeing a record `lag` seconds from now."""
        self.index[object_type].setdefault(object_id, []).append(IndexVersion(now + lag, None))

    def searchable(self, object_type: str, now: float) -> list[tuple[str, dict[str, str]]]:
        """(id, properties) of every record search sees at `now`."""
        found: list[tuple[str, dict[str, str]]] = []
        for object_id, versions in self.index[object_type].items():
            # Newest first: usually the last version is already visible.
            for version in reversed(versions):
                if version.visible_at <= now:
                    if version.properties is not None:
                        found.append((object_id, version.properties))
                    break
        return found

    def associated(self, from_type: str, from_id: str, to_type: str) -> list[str]:
        """Ids of `to_type` records associated with a record."""
        return sorted(
            {
                a.to_id
                for a in self.associations
                if a.from_type == from_type and a.from_id == from_id and a.to_type == to_type
            },
            key=int,
        )

    def associate(self, from_type: str, from_id: str, to_type: str, to_id: str) -> None:
        """Associate two records both ways with HubSpot's default types."""
        self.associations.add(
            Association(from_type, from_id, to_type, to_id, ASSOCIATION_TYPES[(from_type, to_type)])
        )
        self.associations.add(
            Association(to_type, to_id, from_type, from_id, ASSOCIATION_TYPES[(to_type, from_type)])
        )

    def drop_associations(self, object_type: str, object_id: str) -> None:
        """Remove every association touching a record."""
        self.associations = {
            a
            for a in self.associations
            if not (a.from_type == object_type and a.from_id == object_id)
            and not (a.to_type == object_type and a.to_id == object_id)
        }


class SandboxState:
    """The whole emulated HubSpot: portals, tokens, traffic, webhooks and the journal."""

    def __init__(self, config: SandboxConfig) -> None:
        # A private copy, so runtime settings changes never leak into the caller's config.
        self.config = replace(config, portals=list(config.portals))
        self.dispatcher: WebhookDispatcher | None = None
        self.webhook_wakeup = asyncio.Event()
        self.reset()

    def now(self) -> float:
        """The current time by the configured clock."""
        return self.config.clock()

    def reset(self) -> None:
        """Forget everything: data, tokens, traffic, webhooks and journal."""
        now = self.now()
        self.portals: dict[int, PortalWorld] = {
            p.portal_id: PortalWorld(p, now) for p in self.config.portals
        }
        self.codes: dict[str, AuthCode] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.refresh_count: Counter[int] = Counter()
        self.exchange_count: Counter[int] = Counter()
        self.request_log: deque[RequestRecord] = deque(maxlen=5000)
        self.request_counts: Counter[tuple[int | None, str, int]] = Counter()
        self.request_window = RollingWindow(10.0)
        self.search_window = RollingWindow(1.0)
        self.faults: list[Fault] = []
        self.journal: list[JournalEntry] = []
        self.journal_urls: dict[str, tuple[str, float]] = {}
        self.webhook_events: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.webhook_outbox: list[dict[str, Any]] = []
        self.webhook_deliveries: deque[WebhookDelivery] = deque(maxlen=10_000)
        self._event_ids = itertools.count(secrets.randbelow(1_000_000) + 1)
        self._property_subscriptions: dict[str, int] = {}
        if self.config.seed_demo_data:
            from app.sandbox.objects import seed_demo_data

            for world in self.portals.values():
                seed_demo_data(self, world)

    # --- lookups tests use -------------------------------------------------

    def portal(self, portal_id: int) -> PortalWorld:
        """A portal's world (KeyError for an unknown id)."""
        return self.portals[portal_id]

    def contacts(self, portal_id: int) -> list[CrmObject]:
        """A portal's live contacts."""
        return self.portals[portal_id].live("contacts")

    def calls(self, portal_id: int) -> list[CrmObject]:
        """A portal's live calls."""
        return self.portals[portal_id].live("calls")

    def notes(self, portal_id: int) -> list[CrmObject]:
        """A portal's live notes."""
        return self.portals[portal_id].live("notes")

    def properties(self, portal_id: int, object_type: str = "contacts") -> dict[str, PropertyDef]:
        """A portal's property definitions for an object type."""
        return self.portals[portal_id].properties[object_type]

    def issued_secrets(self) -> list[str]:
        """Every token and code ever issued, plus the client secret, for leak scans."""
        return [
            self.config.client_secret,
            *self.access_tokens,
            *self.refresh_tokens,
            *self.codes,
        ]

    # --- tokens -------------------------------------------------------------

    def issue_tokens(self, portal_id: int, scopes: list[str]) -> tuple[AccessToken, RefreshToken]:
        """A new access token and refresh token for a portal."""
        now = self.now()
        refresh = RefreshToken(
            f"na1-{uuid.uuid4()}", portal_id, list(scopes), now, client_id=self.config.client_id
        )
        self.refresh_tokens[refresh.token] = refresh
        return self.issue_access_token(portal_id, scopes, refresh.token), refresh

    def issue_access_token(
        self, portal_id: int | None, scopes: list[str], refresh_token: str | None
    ) -> AccessToken:
        """A new access token; long and random like HubSpot's."""
        now = self.now()
        token = AccessToken(
            token="CN" + secrets.token_urlsafe(72),
            portal_id=portal_id,
            scopes=list(scopes),
            issued_at=now,
            expires_at=now + self.config.access_token_lifetime,
            refresh_token=refresh_token,
        )
        self.access_tokens[token.token] = token
        return token

    def revoke_portal_tokens(self, portal_id: int) -> None:
        """Revoke every token and pending code of a portal."""
        for access in self.access_tokens.values():
            if access.portal_id == portal_id:
                access.revoked = True
        for refresh in self.refresh_tokens.values():
            if refresh.portal_id == portal_id:
                refresh.revoked = True
        for code in self.codes.values():
            if code.portal_id == portal_id:
                code.used = True

    def expire_portal_tokens(self, portal_id: int) -> int:
        """Make a portal's live access tokens expired now; answer how many."""
        now = self.now()
        expired = 0
        for access in self.access_tokens.values():
            if access.portal_id == portal_id and not access.revoked and access.expires_at > now:
                access.expires_at = now
                expired += 1
        return expired

    # --- install lifecycle --------------------------------------------------

    def mark_installed(self, world: PortalWorld, scopes: list[str]) -> None:
        """Record an approved install; a fresh install writes a journal entry."""
        world.granted_scopes = list(scopes)
        if not world.installed:
            world.installed = True
            world.installed_at = self.now()
            self.add_journal_entry(world.portal_id, "APP_INSTALL", INSTALL_EVENT_TYPE)

    def uninstall(self, portal_id: int) -> None:
        """Uninstall the app from a portal: revoke its tokens and journal the uninstall."""
        world = self.portals[portal_id]
        self.revoke_portal_tokens(portal_id)
        if world.installed:
            world.installed = False
            world.uninstalled_at = self.now()
            self.add_journal_entry(portal_id, "APP_UNINSTALL", UNINSTALL_EVENT_TYPE)

    def add_journal_entry(self, portal_id: int, action: str, event_type_id: str) -> JournalEntry:
        """Append an APP_LIFECYCLE_EVENT entry to the webhooks journal."""
        entry = JournalEntry(
            str(uuid.uuid4()), portal_id, action, event_type_id, self.now(), self.config.app_id
        )
        self.journal.append(entry)
        return entry

    def live_journal(self) -> list[JournalEntry]:
        """Journal entries still retained (HubSpot keeps 3 days)."""
        cutoff = self.now() - self.config.journal_retention_seconds
        self.journal = [e for e in self.journal if e.occurred_at >= cutoff]
        return self.journal

    # --- traffic --------------------------------------------------------------

    def record_request(self, record: RequestRecord) -> None:
        """Log one API request."""
        self.request_log.append(record)
        self.request_counts[(record.portal_id, record.endpoint, record.status)] += 1

    # --- webhooks -------------------------------------------------------------

    def subscription_id(self, subscription_type: str, property_name: str | None = None) -> int:
        """The app's subscription id for an event type (one per property for property changes)."""
        if property_name is None:
            return SUBSCRIPTION_IDS[subscription_type]
        base = SUBSCRIPTION_IDS["contact.propertyChange"]
        return self._property_subscriptions.setdefault(
            property_name, base + len(self._property_subscriptions) + 1
        )

    def emit_contact_event(
        self,
        world: PortalWorld,
        subscription_type: str,
        object_id: str,
        source: ChangeSource,
        **extra: Any,
    ) -> None:
        """Queue a contact webhook event, as HubSpot does for a portal with the app installed."""
        if not world.installed:
            return
        event: dict[str, Any] = {
            "eventId": next(self._event_ids),
            "subscriptionId": self.subscription_id(subscription_type, extra.get("propertyName")),
            "portalId": world.portal_id,
            "appId": self.config.app_id,
            "occurredAt": int(self.now() * 1000),
            "subscriptionType": subscription_type,
            "attemptNumber": 0,
            "objectId": int(object_id),
            "changeSource": source.change_source,
            "sourceId": source.source_id,
            **extra,
        }
        self.webhook_events.append(event)
        if self.config.webhook_target_url:
            self.webhook_outbox.append(event)
            self.webhook_wakeup.set()

    def api_source(self) -> ChangeSource:
        """The change source of writes this app makes through the API."""
        return ChangeSource("INTEGRATION", str(self.config.app_id))
