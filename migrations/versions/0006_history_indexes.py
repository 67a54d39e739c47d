"""history indexes: retention and the console's failures read what they need, not all history

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 20:30:00

Inbox rows stay (their keys deduplicate a sender's late retries), so the events table
grows with every event ever received. Two partial indexes hold only what two routine reads
look for: finished events that still hold a payload (retention deletes it after
EVENT_RETENTION_DAYS; it read every finished event, 1.8 s every 10 minutes over 5 million
on SQLite, with intake waiting on its write lock), and failed events (the console counts
each portal's failures of the last day). Neither takes an entry when an event is stored.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a migration keeps meaning what it meant when written.
PAYLOAD_EXPIRY = "payload_ct IS NOT NULL AND finished_at IS NOT NULL"
FAILED = "status = 'failed'"


def upgrade() -> None:
    op.create_index(
        "ix_events_payload_expiry",
        "events",
        ["finished_at"],
        unique=False,
        sqlite_where=sa.text(PAYLOAD_EXPIRY),
        postgresql_where=sa.text(PAYLOAD_EXPIRY),
    )
    op.create_index(
        "ix_events_failed",
        "events",
        ["portal_id", "finished_at"],
        unique=False,
        sqlite_where=sa.text(FAILED),
        postgresql_where=sa.text(FAILED),
    )


def downgrade() -> None:
    op.drop_index("ix_events_failed", table_name="events")
    op.drop_index("ix_events_payload_expiry", table_name="events")
