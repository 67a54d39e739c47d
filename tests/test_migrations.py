"""Migrations: they build the schema the models describe, on both engines."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from app import db


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
