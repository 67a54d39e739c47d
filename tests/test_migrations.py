"""Migrations: they build the schema the models describe, on both engines."""

from __future__ import annotations

import shutil
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from app import db
from app.crypto import TokenCipher
from app.models import UTCDateTime
from app.portals import record_problem
from tests.webhook_support import add_portal


async def test_models_and_migrations_do_not_drift(engine: AsyncEngine) -> None:
    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == []


async def test_database_is_at_head_and_not_behind(engine: AsyncEngine) -> None:
    revision = await db.schema_revision(engine)
    assert revision == db.head_revision()
    assert not db.schema_is_behind(revision)


def test_schema_behind_and_ahead_are_told_apart() -> None:
    assert db.schema_is_behind(None)
    assert not db.schema_is_behind(db.head_revision())
    # A revision this code does not know was written by a newer deploy: still ready.
    assert not db.schema_is_behind("ffffffffffff")


async def test_schema_trouble_says_what_the_database_lacks(engine: AsyncEngine) -> None:
    assert await db.schema_trouble(engine) is None
    head = db.head_revision()
    first = list(ScriptDirectory.from_config(db.alembic_config()).walk_revisions())[-1].revision
    async with engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE alembic_version SET version_num = :first"), {"first": first}
        )
    trouble = await db.schema_trouble(engine)
    assert trouble is not None
    assert trouble.endswith(f"has schema {first}, this code needs {head}: run `hubline migrate`")
    # `hubline migrate` itself only needs to reach the database.
    assert await db.schema_trouble(engine, need_schema=False) is None
    async with engine.begin() as connection:
        await connection.execute(sa.text("DELETE FROM alembic_version"))
    assert "has no Hubline schema" in (await db.schema_trouble(engine) or "")


async def test_the_migrations_to_portals_last_sync_and_event_start_them_from_their_events(
    empty_database_url: str,
) -> None:
    """0005: a portal's last sync is its latest done receptionist event's finish, as the
    console computed it before; HubSpot's events and failures are not syncs. 0007: its
    last event, as the settings page computed it."""
    when = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    portals = sa.table(
        "portals",
        sa.column("portal_id", sa.BigInteger),
        sa.column("hub_domain", sa.String),
        sa.column("status", sa.String),
        sa.column("install_generation", sa.Integer),
        sa.column("scopes", sa.Text),
        *(sa.column(name, UTCDateTime()) for name in ("installed_at", "created_at", "updated_at")),
    )
    events = sa.table(
        "events",
        *(sa.column(name, sa.String) for name in ("source", "type", "idempotency_hash", "status")),
        sa.column("portal_id", sa.BigInteger),
        sa.column("attempts", sa.Integer),
        *(
            sa.column(name, UTCDateTime())
            for name in ("occurred_at", "received_at", "run_after", "finished_at")
        ),
    )

    def event(
        portal_id: int, source: str, status: str, minutes: int, kind: str = "call.completed"
    ) -> dict[str, Any]:
        finished = when + timedelta(minutes=minutes)
        return {
            "portal_id": portal_id,
            "source": source,
            "type": kind,
            "idempotency_hash": f"{portal_id}-{source}-{minutes}",
            "status": status,
            "attempts": 1,
            "occurred_at": when,
            "received_at": finished - timedelta(seconds=1),
            "run_after": when,
            "finished_at": finished,
        }

    engine = db.create_engine(empty_database_url)
    try:
        await db.migrate(engine, "0004")
        async with engine.begin() as connection:
            await connection.execute(
                portals.insert(),
                [
                    {
                        "portal_id": portal_id,
                        "hub_domain": "",
                        "status": "active",
                        "install_generation": 1,
                        "scopes": "",
                        "installed_at": when,
                        "created_at": when,
                        "updated_at": when,
                    }
                    for portal_id in (1001, 1002, 1003)
                ],
            )
            await connection.execute(
                events.insert(),
                [
                    event(1001, "receptionist", "done", 5),
                    event(1001, "receptionist", "done", 9),
                    event(1001, "receptionist", "failed", 30),
                    event(1001, "hubspot", "done", 40),
                    event(1001, "receptionist", "done", 45, kind="test.ping"),
                    event(1002, "hubspot", "done", 50),
                ],
            )

        assert await db.migrate(engine) == "0004"

        async with engine.connect() as connection:
            activity = sa.table(
                "portals",
                sa.column("portal_id", sa.BigInteger),
                sa.column("last_synced_at", UTCDateTime()),
                sa.column("last_event_at", UTCDateTime()),
            )
            found = {row[0]: row[1:] for row in await connection.execute(sa.select(activity))}
        # 0007: the newest receptionist event received, failed or not, test events aside.
        newest_call = when + timedelta(minutes=30) - timedelta(seconds=1)
        assert found == {
            1001: (when + timedelta(minutes=9), newest_call),
            1002: (None, None),
            1003: (None, None),
        }
    finally:
        await engine.dispose()


def with_probe_migration(tmp_path: Path, upgrade: str) -> Path:
    """This code's migrations, copied, plus revision 0099 after the head running `upgrade`."""
    migrations = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    probe = f"""\"\"\"a probe migration of the tests\"\"\"

import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = "{db.head_revision()}"
branch_labels = None
depends_on = None


def upgrade() -> None:
{textwrap.indent(textwrap.dedent(upgrade).strip(), "    ")}
"""
    (migrations / "versions" / "0099_probe.py").write_text(probe)
    return migrations


async def _children(engine: AsyncEngine) -> dict[str, int]:
    counts = {}
    async with engine.connect() as connection:
        for table in ("receptionist_secrets", "portal_problems"):
            query = sa.text(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
            counts[table] = (await connection.execute(query)).scalar_one()
    return counts


async def test_a_migration_rebuilding_a_parent_table_keeps_its_children(
    engine: AsyncEngine, sessions: db.SessionFactory, cipher: TokenCipher, tmp_path: Path
) -> None:
    # On SQLite, batch mode rebuilds a table (copy, drop, rename); with the foreign keys
    # every connection turns on, dropping `portals` under its secrets and problems failed
    # (and the pragma cannot change inside the migration's transaction).
    await add_portal(sessions, cipher, 1001)
    async with db.transaction(sessions) as session:
        await record_problem(1001, "probe", "a problem to keep", session=session)
    # As altering a column would on SQLite; PostgreSQL alters the table in place.
    migrations = with_probe_migration(
        tmp_path,
        """
        rebuild = "always" if op.get_bind().dialect.name == "sqlite" else "auto"
        with op.batch_alter_table("portals", recreate=rebuild) as batch_op:
            batch_op.add_column(sa.Column("probe", sa.Integer(), nullable=True))
        """,
    )
    before = await _children(engine)

    assert await db.migrate(engine, migrations=migrations) == db.head_revision()

    assert await db.schema_revision(engine) == "0099"
    assert await _children(engine) == before == {"receptionist_secrets": 1, "portal_problems": 1}
    async with engine.connect() as connection:
        probed = sa.text("SELECT count(*) FROM portals WHERE probe IS NULL")
        assert (await connection.execute(probed)).scalar_one() == 1
        if connection.dialect.name == "sqlite":
            # The pool's connections still enforce the keys: the migrating one was dropped.
            enforced = await connection.exec_driver_sql("PRAGMA foreign_keys")
            assert enforced.scalar_one() == 1


@pytest.mark.sqlite_only  # PostgreSQL's foreign keys stay on during migrations
async def test_a_migration_leaving_orphans_on_sqlite_is_refused_and_rolled_back(
    engine: AsyncEngine, sessions: db.SessionFactory, cipher: TokenCipher, tmp_path: Path
) -> None:
    # With the keys off during the migration, SQLite would not have refused it itself.
    await add_portal(sessions, cipher, 1001)
    migrations = with_probe_migration(tmp_path, 'op.execute("DELETE FROM portals")')
    with pytest.raises(CommandError, match="left 1 row"):
        await db.migrate(engine, migrations=migrations)
    assert await db.schema_revision(engine) == db.head_revision()
    assert await _children(engine) == {"receptionist_secrets": 1, "portal_problems": 0}
