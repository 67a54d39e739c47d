"""drop engagements by contact: a contact's newest synced event is read from the events

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 18:40:00

The sync now reads it from the done receptionist events (`ix_events_portal_contact`), so
a text whose note is still queued counts; the index cost every engagement insert.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("engagements", schema=None) as batch_op:
        batch_op.drop_index("ix_engagements_portal_contact")


def downgrade() -> None:
    with op.batch_alter_table("engagements", schema=None) as batch_op:
        batch_op.create_index(
            "ix_engagements_portal_contact", ["portal_id", "contact_id"], unique=False
        )
