"""Helpers for the install, client and lifecycle tests (not fixtures: plain functions)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db
from app.hubspot.runtime import Backoff


def fast_backoff(services: Any) -> None:
    """Tiny backoff and cooldown, so retry tests take milliseconds."""
    services.hubspot.backoff = Backoff(
        base_seconds=0.001, cap_seconds=0.005, refresh_cooldown_seconds=0.2
    )


async def table_count(engine: AsyncEngine, table: str, where: str = "") -> int:
    async with engine.connect() as connection:
        query = f"SELECT count(*) FROM {table} {where}"  # noqa: S608 - test-only, fixed names
        return int((await connection.execute(sa.text(query))).scalar_one())


async def stored_text(database_url: str) -> bytes:
    """Everything the database holds, as bytes to search for plaintext secrets.

    SQLite: the database file with its WAL. PostgreSQL: every row of every table,
    as text (bytea shows as hex, so callers search for the hex form too).
    """
    path = db.sqlite_path(database_url)
    if path is not None:
        return await asyncio.to_thread(_sqlite_files, path)
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with engine.connect() as connection:
            tables = (
                await connection.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalars()
            out = []
            for table in list(tables):
                rows = await connection.execute(sa.text(f'SELECT t::text FROM "{table}" t'))  # noqa: S608
                out.extend(row[0] for row in rows)
    finally:
        await engine.dispose()
    return "\n".join(out).encode()


def _sqlite_files(path: Path) -> bytes:
    files = [Path(str(path) + suffix) for suffix in ("", "-wal", "-shm")]
    return b"".join(file.read_bytes() for file in files if file.exists())


def assert_none_stored(haystack: bytes, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret.encode() not in haystack, "a plaintext secret is stored"
        assert secret.encode().hex().encode() not in haystack, "a plaintext secret is stored"


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def served_over_tcp(app: Any) -> AsyncIterator[str]:
    """Serve an (already started) ASGI app on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    )
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(_started(server), timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def _started(server: Any) -> Any:
    async def check() -> bool:
        return bool(server.started)

    return check


def hubline_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment a Hubline process needs to share this test's database and key."""
    import os

    from tests.conftest import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_KEY

    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "TOKEN_"))}
    return {
        **keep,
        "DATABASE_URL": database_url,
        "HUBSPOT_CLIENT_ID": TEST_CLIENT_ID,
        "HUBSPOT_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
        "PUBLIC_URL": "http://hubline.test",
        "JOURNAL_POLL_SECONDS": "0",
        **extra,
    }


async def until_waiting_on_locks(engine: AsyncEngine, count: int, timeout: float = 30) -> int:
    """Wait until `count` sessions of the database wait on a lock (PostgreSQL); how many do."""
    waiting = 0
    for _ in range(int(timeout / 0.05)):
        # A new connection each time: pg_stat_activity is read once per transaction.
        async with engine.connect() as watcher:
            waiting = int(
                await watcher.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                or 0
            )
        if waiting >= count:
            break
        await asyncio.sleep(0.05)
    return waiting
