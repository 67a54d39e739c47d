"""The database: engine, sessions, migrations and the schema check behind /readyz."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def _migrations_dir() -> Path:
    package = Path(__file__).resolve().parent
    # An installed wheel carries the scripts inside the package (pyproject.toml maps
    # them there); a checkout, editable installs included, has them at its top level.
    shipped = package / "migrations"
    return shipped if (shipped / "env.py").is_file() else package.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()

SessionFactory = async_sessionmaker[AsyncSession]

# PostgreSQL's advisory locks are named by a number; this one is "hubline" in ASCII.
MIGRATION_LOCK_KEY = int.from_bytes(b"hubline")

# What "the database cannot be used" looks like: SQLAlchemy wraps driver errors, but a
# refused connection or a pool timeout can surface as the driver's or the OS's own.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


_T = TypeVar("_T")

# How long /readyz and /metrics wait for the database: one that stopped answering (a
# partition, a frozen server, another process holding SQLite's write lock) holds a
# query open for as long as TCP does, or SQLite's busy timeout.
DATABASE_PROBE_SECONDS = 5.0

# What a database that cannot be used now raises, as opposed to a statement's own fault
# (a constraint, a bug): the connection refused, dropped or timed out, the server
# starting, the host not found.
UNREACHABLE: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    ConnectionError,
    socket.gaierror,
)


# Ids are BIGINT columns on both engines: a larger number names nothing, and binding it
# would fail in the driver (SQLite's "Python int too large") rather than find no row.
MAX_BIGINT = 2**63 - 1


async def answered_within(seconds: float, work: Awaitable[_T]) -> _T:
    """`work`'s result, or TimeoutError once `seconds` have passed, without waiting for it.

    Not `asyncio.wait_for`, which waits for the cancelled work to end: a cancelled query
    rolls back its connection first, and on SQLite that waits in line behind the query
    itself (aiosqlite's one thread), for the whole busy timeout. The work is cancelled and
    ends by itself once the database answers.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError(f"the database did not answer within {seconds:g} s")
    return task.result()


# Abandoned work, held until it ends (the loop keeps only weak references to tasks).
_abandoned: set[asyncio.Future[Any]] = set()


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    # Its outcome is of no use any longer; retrieved, so asyncio does not log it.
    if not task.cancelled():
        task.exception()


def fits_bigint(value: int) -> bool:
    return 0 <= value <= MAX_BIGINT


def parse_id(text: str) -> int | None:
    """A row id or portal id given as text (ASCII digits within BIGINT), else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if fits_bigint(value) else None


def create_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; on SQLite, WAL and a busy timeout so web and worker share the file."""
    if database_url.startswith("sqlite"):
        engine = create_async_engine(
            database_url, connect_args={"timeout": 30}, pool_pre_ping=False, **kwargs
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        # A deferred BEGIN that reads and then writes fails at once with SQLITE_BUSY
        # when another connection wrote in between (WAL cannot upgrade a stale
        # snapshot); BEGIN IMMEDIATE takes the write lock up front and waits for it
        # under busy_timeout instead. Transactions thus run one at a time, as SQLite's
        # writers do anyway; PostgreSQL is the engine for concurrency.
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        event.listen(engine.sync_engine, "close", _sqlite_roll_back_before_close)
        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
        kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(database_url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    if connection.get_execution_options().get(MIGRATING):
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_roll_back_before_close(dbapi_connection: Any, _record: Any) -> None:
    # A task cancelled between a statement's first step and its last (an INSERT ...
    # RETURNING whose rows were not yet fetched) makes SQLAlchemy close the connection.
    # sqlite3 cannot finalize the statement its cursor still holds, so the connection
    # lives on as a zombie keeping the write lock, and every other connection (another
    # process's too) waits out busy_timeout. A rollback first aborts the statement and
    # releases the lock. Garbage collection closes connections where nothing can be
    # awaited: that closing goes ahead alone.
    with suppress(Exception):
        dbapi_connection.run_async(_roll_back)


async def _roll_back(driver_connection: Any) -> None:
    # Shielded: a second cancellation must not stop it (the driver runs it before the close).
    await asyncio.shield(driver_connection.rollback())


def session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: SessionFactory) -> AsyncIterator[AsyncSession]:
    """A session inside one transaction: committed on success, rolled back on error."""
    async with sessions() as session, session.begin():
        yield session


def alembic_config(
    database_url: str | None = None, migrations: Path = MIGRATIONS_DIR
) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@functools.cache
def _shipped_revisions() -> tuple[str, frozenset[str]]:
    """This code's head revision and all its revisions."""
    # Read once: they ship with the code, and reading them takes milliseconds, which
    # /readyz would spend on every probe.
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head, frozenset(rev.revision for rev in script.walk_revisions())


def head_revision() -> str:
    return _shipped_revisions()[0]


# Tables every Hubline schema has had: a revision this code lacks counts as a newer
# Hubline's only where they are.
HUBLINE_TABLES = ("portals", "events", "oauth_tokens")


# Set on a SQLite connection that migrates: its transaction begins with foreign keys off.
MIGRATING = "hubline_migrating"


async def migrate(
    engine: AsyncEngine, revision: str = "head", *, migrations: Path = MIGRATIONS_DIR
) -> str | None:
    """Upgrade the schema to `revision` on this engine's database; answers the revision it
    found (None for none), read in the migration's own turn."""

    def upgrade(connection: Connection) -> str | None:
        found = MigrationContext.configure(connection).get_current_revision()
        if schema_is_ahead(found):
            # Migrated by a newer Hubline (this one is a rollback, or the old half of a
            # rolling deploy): it serves that schema, so there is nothing to do. Unless
            # the tables are not Hubline's: another application's database, a wrong URL.
            inspector = sa.inspect(connection)
            if not all(inspector.has_table(name) for name in HUBLINE_TABLES):
                raise CommandError(
                    f"the database is at revision {found}, which is not Hubline's, and lacks "
                    "Hubline's tables: check DATABASE_URL"
                )
            return found
        config = alembic_config(migrations=migrations)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        migrated = MigrationContext.configure(connection).get_current_revision() != found
        if migrated and connection.dialect.name == "sqlite":
            orphans = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if orphans:
                raise CommandError(
                    f"the migration left {len(orphans)} row(s) whose parent row is gone "
                    f"(first in table {orphans[0][0]})"
                )
        return found

    if engine.dialect.name == "sqlite":
        return await _migrate_sqlite(engine, upgrade)
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Deploys may migrate one database at once (each web container of the image
            # runs `hubline migrate` as it starts). They take turns on a lock held until
            # the migration commits, and the next finds the schema current. On SQLite the
            # BEGIN IMMEDIATE of every transaction already makes them take turns.
            await connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        return await connection.run_sync(upgrade)


async def _migrate_sqlite(
    engine: AsyncEngine, upgrade: Callable[[Connection], str | None]
) -> str | None:
    """Run `upgrade` in a transaction that begins with SQLite's foreign keys off."""
    # Batch mode changes a table by rebuilding it (copy, drop, rename), and dropping a
    # table other tables' rows point at fails while foreign keys are on, as every
    # connection turns them on; the pragma cannot change inside a transaction, so the
    # BEGIN hook sets it first, and `upgrade` checks the keys before the commit.
    async with engine.connect() as connection:
        await connection.execution_options(**{MIGRATING: True})
        try:
            async with connection.begin():
                return await connection.run_sync(upgrade)
        finally:
            # Its foreign keys are off: the pool must never hand it out again.
            await connection.invalidate()


async def schema_revision(engine: AsyncEngine) -> str | None:
    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(current)


def schema_is_ahead(current: str | None) -> bool:
    """True when the database was migrated by newer code (a revision this code lacks)."""
    return current is not None and current not in _shipped_revisions()[1]


def schema_is_behind(current: str | None) -> bool:
    """True when the database lacks migrations this code needs; a schema ahead is fine."""
    if current is None:
        return True
    # An unknown revision was written by newer code: rolling deploys keep serving.
    return current != head_revision() and not schema_is_ahead(current)


def sqlite_path(database_url: str) -> Path | None:
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


async def migrate_fresh_sqlite(engine: AsyncEngine, database_url: str) -> bool:
    """Migrate a SQLite database that has no schema yet, under a file lock; True if it did."""
    path = sqlite_path(database_url)
    if path is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".migrate-lock")
    with lock_path.open("w") as lock_file:
        # Two processes started together (web and worker) must not both migrate.
        await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
        try:
            # Only a database with nothing in it: a file holding other tables is not
            # Hubline's to fill (DATABASE_URL may point at the wrong file), and its
            # commands then say it has no Hubline schema.
            if await schema_revision(engine) is not None or await _has_tables(engine):
                return False
            await migrate(engine)
            return True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


async def _has_tables(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        found = await connection.execute(
            sa.text("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1")
        )
        return found.first() is not None


def redacted_url(database_url: str | URL) -> str:
    """The URL to show a person: its password masked, and no query (which can carry one)."""
    return make_url(database_url).set(query={}).render_as_string(hide_password=True)


def error_reason(error: BaseException) -> str:
    """The driver's own first line of a database error, without SQLAlchemy's statement
    and parameters (which can carry stored values)."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:200]


async def schema_trouble(engine: AsyncEngine, *, need_schema: bool = True) -> str | None:
    """Why this database cannot serve Hubline now (unreachable, or its schema is missing
    or behind the code), or None when it can."""
    shown = redacted_url(engine.url)
    try:
        revision = await asyncio.wait_for(schema_revision(engine), timeout=10)
    except DATABASE_ERRORS as error:
        return f"cannot reach the database at {shown}: {error_reason(error)}"
    if need_schema and schema_is_behind(revision):
        have = f"schema {revision}" if revision else "no Hubline schema"
        return (
            f"the database at {shown} has {have}, this code needs {head_revision()}: "
            "run `hubline migrate`"
        )
    return None


def missing_sqlite_file(database_url: str) -> str | None:
    """Why a command that works on an existing database cannot use `database_url`: its
    SQLite file does not exist (connecting would leave an empty one behind)."""
    path = sqlite_path(database_url)
    if path is None or path.exists():
        return None
    if not path.parent.is_dir():
        return _no_folder(path, database_url)
    return (
        f"there is no database at {redacted_url(database_url)}: check DATABASE_URL, or run "
        "`hubline migrate` to create one"
    )


def _no_folder(path: Path, database_url: str) -> str:
    shown = redacted_url(database_url)
    return f"there is no folder {path.parent} for the database at {shown}: check DATABASE_URL"


async def database_trouble(database_url: str, *, need_schema: bool = True) -> str | None:
    """`schema_trouble` of the database at `database_url`, or a SQLite file's missing folder."""
    path = sqlite_path(database_url)
    if path is not None and not path.parent.is_dir():
        return _no_folder(path, database_url)
    engine = create_engine(database_url)
    try:
        return await schema_trouble(engine, need_schema=need_schema)
    finally:
        await engine.dispose()


def rowcount(result: sa.Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched (the typed Result hides CursorResult's count)."""
    return int(getattr(result, "rowcount", 0))


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))


# A database that is not up yet, as a deploy starting it alongside Hubline meets it: no
# server listening (or its host name not resolvable) yet, or PostgreSQL still starting.
_NOT_UP_YET: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


def not_up_yet(error: BaseException) -> bool:
    """True when `error` says the database is not up yet, rather than refusing us (a wrong
    password or database name), which waiting would not change."""
    candidate: BaseException | None = error
    for _ in range(5):  # SQLAlchemy's wrapper, the driver's error, the OS's beneath it
        if candidate is None:
            return False
        if isinstance(candidate, _NOT_UP_YET):
            return True
        orig = candidate.orig if isinstance(candidate, sa.exc.DBAPIError) else None
        candidate = orig or candidate.__cause__ or candidate.__context__
    return False


async def wait_for_database(
    engine: AsyncEngine, *, seconds: float, on_wait: Callable[[BaseException], None]
) -> None:
    """Return once the database answers, waiting up to `seconds` while it is not up yet;
    `on_wait` hears the first error waited on. Anything else is raised at once."""
    deadline = time.monotonic() + seconds
    waited = False
    while True:
        left = deadline - time.monotonic()
        try:
            # A host that drops connections would otherwise hold us past the deadline.
            await asyncio.wait_for(ping(engine), timeout=max(left, 1.0))
            return
        except DATABASE_ERRORS as error:
            if not not_up_yet(error) or time.monotonic() >= deadline:
                raise
            if not waited:
                on_wait(error)
                waited = True
        await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
