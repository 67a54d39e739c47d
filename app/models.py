"""Hubline's tables. Secrets and callers' details are stored only as ciphertexts or keyed hashes."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel, col


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both engines (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _when(*, nullable: bool = False, index: bool = False, **kwargs: Any) -> Any:
    return Field(sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index, **kwargs))


def _created() -> Any:
    return Field(default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False))


class PortalStatus(StrEnum):
    active = "active"
    needs_reauth = "needs_reauth"
    uninstalled = "uninstalled"


class EventStatus(StrEnum):
    pending = "pending"
    in_progress = "in_progress"
    done = "done"
    skipped = "skipped"
    failed = "failed"
    parked = "parked"


class EventSource(StrEnum):
    hubspot = "hubspot"
    receptionist = "receptionist"
    journal = "journal"
    lifecycle = "lifecycle"
    internal = "internal"


class Portal(SQLModel, table=True):
    """An installed (or once installed) HubSpot portal; `portal_id` is HubSpot's hub id."""

    __tablename__ = "portals"

    portal_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=False)
    )
    hub_domain: str = Field(default="", max_length=255)
    status: str = Field(default=PortalStatus.active, max_length=16, index=True)
    install_generation: int = Field(default=1)
    scopes: str = Field(default="", sa_type=sa.Text)
    default_phone_region: str | None = Field(default=None, max_length=4)
    installed_at: datetime = _created()
    uninstalled_at: datetime | None = _when(nullable=True)
    created_at: datetime = _created()
    updated_at: datetime = _created()
    # When the worker last synced one of its receptionist events: written with the batch's
    # outcomes, so the console need not find it among every event the portal ever had.
    last_synced_at: datetime | None = _when(nullable=True)
    # When the newest of its receptionist events the worker took up arrived (test events
    # aside), whatever became of it: the settings page's sign of a connected receptionist.
    last_event_at: datetime | None = _when(nullable=True)

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(self.scopes.split())


class PortalProblem(SQLModel, table=True):
    """Something wrong with a portal that its admin or the operator should see."""

    __tablename__ = "portal_problems"
    __table_args__ = (sa.UniqueConstraint("portal_id", "code"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigIntPK, primary_key=True))
    portal_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("portals.portal_id"), nullable=False)
    )
    code: str = Field(max_length=128)
    message: str = Field(sa_type=sa.Text)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class OAuthToken(SQLModel, table=True):
    """A portal's OAuth tokens, encrypted; `version` makes refreshes compare-and-swap."""

    __tablename__ = "oauth_tokens"

    portal_id: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("portals.portal_id"), primary_key=True, autoincrement=False
        )
    )
    access_token_ct: bytes = Field(sa_type=sa.LargeBinary)
    refresh_token_ct: bytes = Field(sa_type=sa.LargeBinary)
    key_id: str = Field(max_length=16, index=True)
    expires_at: datetime = _when()
    version: int = Field(default=1)
    install_generation: int = Field(default=1)
    updated_at: datetime = _created()


class OAuthState(SQLModel, table=True):
    """A one-time OAuth state, stored as a hash and bound to the browser by a cookie."""

    __tablename__ = "oauth_states"

    state_hash: str = Field(primary_key=True, max_length=64)
    browser_hash: str = Field(max_length=64)
    code_verifier_ct: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    key_id: str | None = Field(default=None, max_length=16)
    expires_at: datetime = _when(index=True)
    created_at: datetime = _created()


class ReceptionistSecret(SQLModel, table=True):
    """A portal's receptionist signing secret; a rotated one keeps working until `expires_at`."""

    __tablename__ = "receptionist_secrets"

    id: int | None = Field(default=None, sa_column=sa.Column(BigIntPK, primary_key=True))
    portal_id: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("portals.portal_id"), nullable=False, index=True
        )
    )
    secret_ct: bytes = Field(sa_type=sa.LargeBinary)
    key_id: str = Field(max_length=16, index=True)
    created_at: datetime = _created()
    expires_at: datetime | None = _when(nullable=True)


class IdentityEntry(SQLModel, table=True):
    """Blind index: a keyed hash of a normalized phone or email → the HubSpot contact id.

    `removed_at` marks an entry whose contact was deleted: lookups skip it, but a privacy
    deletion arriving after the deletion can still find which callers were that contact.
    """

    __tablename__ = "identity_index"
    __table_args__ = (
        sa.UniqueConstraint("portal_id", "kind", "value_hash"),
        sa.Index("ix_identity_index_portal_contact", "portal_id", "contact_id"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigIntPK, primary_key=True))
    portal_id: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    kind: str = Field(max_length=8)
    value_hash: str = Field(max_length=80)
    contact_id: str = Field(max_length=32)
    updated_at: datetime = _created()
    removed_at: datetime | None = _when(nullable=True)


# HubSpot's event for a contact deleted under privacy law (GDPR): Hubline erases what it
# holds of the person, before any other pending event of the portal can recreate them.
PRIVACY_DELETION = "contact.privacyDeletion"
ERASURES_DUE = f"type = '{PRIVACY_DELETION}' AND status = 'pending'"
# Finished events that still hold a payload: the last EVENT_RETENTION_DAYS of them, which
# retention reads by when they finished. An event is stored unfinished, so intake adds no
# entry to this index, nor to the failed events' below.
PAYLOAD_EXPIRY = "payload_ct IS NOT NULL AND finished_at IS NOT NULL"
FAILED = "status = 'failed'"


class InboxEvent(SQLModel, table=True):
    """One durable inbox for every input: webhooks, receptionist events, lifecycle signals, jobs."""

    __tablename__ = "events"
    __table_args__ = (
        sa.UniqueConstraint(
            "portal_id", "source", "idempotency_hash", name="uq_events_idempotency"
        ),
        # What the worker reads: a portal's due events in order.
        sa.Index("ix_events_portal_due", "portal_id", "status", "occurred_at", "id"),
        # What the claimer reads: which portals have due work.
        sa.Index("ix_events_due", "status", "run_after"),
        sa.Index("ix_events_portal_contact", "portal_id", "contact_id"),
        # What the worker reads first: a portal's pending privacy deletions (rare, so the
        # partial index is small). `type` and `status` are constant in it, but named they
        # make it the planner's pick over ix_events_portal_due for that read.
        sa.Index(
            "ix_events_erasures_due",
            "portal_id",
            "type",
            "status",
            "occurred_at",
            "id",
            sqlite_where=sa.text(ERASURES_DUE),
            postgresql_where=sa.text(ERASURES_DUE),
        ),
        sa.Index(
            "ix_events_payload_expiry",
            "finished_at",
            sqlite_where=sa.text(PAYLOAD_EXPIRY),
            postgresql_where=sa.text(PAYLOAD_EXPIRY),
        ),
        # What the console reads: a portal's recent failures (failed events stay forever).
        sa.Index(
            "ix_events_failed",
            "portal_id",
            "finished_at",
            sqlite_where=sa.text(FAILED),
            postgresql_where=sa.text(FAILED),
        ),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigIntPK, primary_key=True))
    portal_id: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    source: str = Field(max_length=16)
    type: str = Field(max_length=64)
    idempotency_hash: str = Field(max_length=80)
    occurred_at: datetime = _when()
    received_at: datetime = _created()
    payload_ct: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    key_id: str | None = Field(default=None, max_length=16, index=True)
    status: str = Field(default=EventStatus.pending, max_length=16)
    attempts: int = Field(default=0)
    run_after: datetime = _created()
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = _when(nullable=True)
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    result: str | None = Field(default=None, sa_type=sa.Text)
    contact_id: str | None = Field(default=None, max_length=32)
    finished_at: datetime | None = _when(nullable=True)


def failed_status() -> sa.ColumnElement[bool]:
    """`status = 'failed'` written into the statement, so a planner sees that it implies
    ix_events_failed's condition before any value is known (a bound value would not)."""
    failed = sa.bindparam(
        "failed_status", EventStatus.failed.value, sa.String, literal_execute=True
    )
    return col(InboxEvent.status) == failed


class PortalLease(SQLModel, table=True):
    """Which worker serves a portal now; an expired lease may be taken over."""

    __tablename__ = "portal_leases"

    portal_id: int = Field(
        sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=False)
    )
    owner: str | None = Field(default=None, max_length=64)
    expires_at: datetime | None = _when(nullable=True, index=True)


class Lease(SQLModel, table=True):
    """An app-wide singleton lease (the journal poller runs in one worker at a time)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=64)
    owner: str | None = Field(default=None, max_length=64)
    expires_at: datetime | None = _when(nullable=True)


class EngagementRecord(SQLModel, table=True):
    """The HubSpot engagement one inbox event produced: at most one per event."""

    __tablename__ = "engagements"
    __table_args__ = (sa.UniqueConstraint("event_id", name="uq_engagements_event"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigIntPK, primary_key=True))
    portal_id: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, index=True))
    event_id: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    object_type: str = Field(max_length=16)
    engagement_id: str = Field(max_length=32)
    contact_id: str = Field(max_length=32)
    created_at: datetime = _created()


class AppState(SQLModel, table=True):
    """Small app-wide values: the journal offset, the encryption keys' fingerprint."""

    __tablename__ = "app_state"

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_type=sa.Text)
    updated_at: datetime = _created()
