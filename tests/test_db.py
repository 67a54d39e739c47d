"""The database layer's own guarantees, below any table."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from app import db


async def test_a_statement_cancelled_midway_leaves_the_sqlite_file_writable(
    tmp_path: Path,
) -> None:
    # A worker's periodic job cancelled at shutdown between an INSERT ... RETURNING's
    # execution and the fetch of its row once kept the write lock for busy_timeout (30 s),
    # hanging the worker's own shutdown and every other process's writes.
    path = tmp_path / "hubline.db"
    engine = db.create_engine(f"sqlite+aiosqlite:///{path}")
    executing = threading.Event()
    go_on = threading.Event()

    def hold(value: int) -> int:
        executing.set()
        go_on.wait(10)
        return value

    @event.listens_for(engine.sync_engine, "connect")
    def add_hold(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("hold", 1, hold)

    async with engine.begin() as connection:
        await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")

    async def insert() -> None:
        async with db.transaction(db.session_factory(engine)) as session:
            await session.execute(sa.text("INSERT INTO t VALUES (1) RETURNING hold(x)"))

    inserting = asyncio.create_task(insert())
    assert await asyncio.to_thread(executing.wait, 10)
    inserting.cancel()
    go_on.set()
    with contextlib.suppress(asyncio.CancelledError):
        await inserting

    def write_as_another_process() -> list[int]:
        with contextlib.closing(sqlite3.connect(path, timeout=2)) as other:
            other.execute("INSERT INTO t VALUES (2)")
            other.commit()
            return [row[0] for row in other.execute("SELECT x FROM t")]

    try:
        assert await asyncio.to_thread(write_as_another_process) == [2], (
            "the cancelled insert is rolled back and the lock released"
        )
    finally:
        await engine.dispose()
