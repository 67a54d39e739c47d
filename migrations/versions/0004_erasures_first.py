"""erasures first: the worker reads a portal's pending privacy deletions before its other events

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 06:10:00

A partial index: it holds only pending `contact.privacyDeletion` events, so the check
the worker makes before each claim costs nothing however long the portal's backlog.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a migration keeps meaning what it meant when written.
ERASURES_DUE = "type = 'contact.privacyDeletion' AND status = 'pending'"


def upgrade() -> None:
    op.create_index(
        "ix_events_erasures_due",
        "events",
        ["portal_id", "type", "status", "occurred_at", "id"],
        unique=False,
        sqlite_where=sa.text(ERASURES_DUE),
        postgresql_where=sa.text(ERASURES_DUE),
    )


def downgrade() -> None:
    op.drop_index("ix_events_erasures_due", table_name="events")
