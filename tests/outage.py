"""A real database outage for tests: the database goes away, then comes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


@contextlib.asynccontextmanager
async def database_outage(engine: AsyncEngine, database_url: str) -> AsyncIterator[None]:
    """Inside, `engine` cannot reach its database; afterwards it can again.

    SQLite: the file (and its WAL) is moved aside and replaced by one that is not a
    database. PostgreSQL: the database's connections are terminated and it is renamed,
    so reconnecting fails as it would against a server that lost it.
    """
    url = make_url(database_url)
    assert url.database
    if url.drivername.startswith("sqlite"):
        async with _sqlite_outage(engine, Path(url.database)):
            yield
        return
    admin = create_async_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    name, away = url.database, f"{url.database}_away"
    try:
        async with admin.connect() as connection:
            # A client polling every few milliseconds (a worker) can reconnect between the
            # terminate and the rename, which then refuses ("being accessed by other
            # users"): terminated again until the rename finds it alone.
            for attempt in range(50):
                await connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                try:
                    await connection.execute(sa.text(f'ALTER DATABASE "{name}" RENAME TO "{away}"'))
                    break
                except sa.exc.DBAPIError:
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.01)
        try:
            yield
        finally:
            async with admin.connect() as connection:
                await connection.execute(sa.text(f'ALTER DATABASE "{away}" RENAME TO "{name}"'))
    finally:
        await admin.dispose()


@contextlib.asynccontextmanager
async def _sqlite_outage(engine: AsyncEngine, path: Path) -> AsyncIterator[None]:
    await engine.dispose()
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    moved = []
    for file in files:
        if file.exists():
            file.rename(file.with_name(file.name + ".away"))
            moved.append(file)
    await asyncio.to_thread(path.write_bytes, b"this is not a SQLite database\n" * 256)
    try:
        yield
    finally:
        await engine.dispose()
        for file in files:
            file.unlink(missing_ok=True)
        for file in moved:
            file.with_name(file.name + ".away").rename(file)
