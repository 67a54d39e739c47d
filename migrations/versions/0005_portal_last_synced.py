"""portal last synced: when the worker last synced one of a portal's receptionist events

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 19:30:00

The operator console showed each portal's last sync as the latest `finished_at` among its
done receptionist events, which no index serves: every page load read every event ever
handled (14 s over 5 million events on SQLite). The worker now writes it on the portal
with each batch's outcomes; the column starts from what the events say.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("portals") as batch_op:
        batch_op.add_column(sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=True))
    # Written out rather than built from the models: a migration keeps meaning what it
    # meant when written. One pass over the events, once: on PostgreSQL one aggregate
    # (a parallel scan; a subquery per portal read each portal's events through the
    # index, 20 times slower), on SQLite a subquery per portal (as fast there, and older
    # SQLite versions lack UPDATE ... FROM).
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            UPDATE portals SET last_synced_at = synced.at
            FROM (
                SELECT events.portal_id, max(events.finished_at) AS at FROM events
                WHERE events.status = 'done' AND events.source = 'receptionist'
                  AND events.type <> 'test.ping'
                GROUP BY events.portal_id
            ) AS synced
            WHERE portals.portal_id = synced.portal_id
            """
        )
    else:
        op.execute(
            """
            UPDATE portals SET last_synced_at = (
                SELECT max(events.finished_at) FROM events
                WHERE events.portal_id = portals.portal_id
                  AND events.status = 'done' AND events.source = 'receptionist'
                  AND events.type <> 'test.ping'
            )
            """
        )


def downgrade() -> None:
    with op.batch_alter_table("portals") as batch_op:
        batch_op.drop_column("last_synced_at")
