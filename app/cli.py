"""The `hubline` command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TextIO, TypeVar

from app.errors import ConfigurationError, CryptoError
from app.settings import Settings, load_database_settings, load_settings

_T = TypeVar("_T")

Command = Callable[[argparse.Namespace], Awaitable[int]]


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a line per step elsewhere."""

    def __init__(
        self, label: str, total: int | None = None, *, stream: TextIO = sys.stderr
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream
        self.interactive = stream.isatty()

    def advance(self, count: int = 1) -> None:
        self.done += count
        of_total = f"/{self.total}" if self.total is not None else ""
        line = f"{self.label}: {self.done}{of_total}"
        if self.interactive:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.interactive and self.done:
            self.stream.write("\n")
            self.stream.flush()


def settings_from_environment() -> Settings:
    return load_settings()


class StopDeadline:
    """Ends the process if a graceful stop, once asked for, outlasts its time.

    A database that stopped answering (a partition, a frozen server) holds a query, the
    rollback after it and the pool's close open for as long as TCP keeps the connection,
    and the stop waits on them. Ending then loses nothing acknowledged: a webhook was
    answered 2xx only after its commit, and a worker's leases run out, for another worker
    to take its portals' events.
    """

    def __init__(self, command: str, seconds: float) -> None:
        self.command = command
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start counting (a second signal changes nothing)."""
        if self._timer is None:
            self._timer = threading.Timer(self.seconds, self._overdue)
            self._timer.daemon = True
            self._timer.start()

    def _overdue(self) -> None:
        try:
            logging.getLogger(__name__).error(
                "hubline %s: still stopping after %g s (SHUTDOWN_TIMEOUT_SECONDS), most likely "
                "waiting on a database that does not answer: exiting now",
                self.command,
                self.seconds,
            )
            sys.stderr.flush()
        finally:
            os._exit(1)  # whatever the logging did: this is what the timer is for


# --- serve, worker, migrate ---------------------------------------------------


async def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logs import configure_logging
    from app.main import close_services, create_app, open_services

    settings = settings_from_environment()
    configure_logging(args.log_level)
    # uvicorn finds a busy port only after the app (and its worker) started, and exits 3,
    # which here means unreadable secrets: checked first, it is the command's one line.
    if not port_is_free(args.host, args.port):
        return refuse(
            f"hubline serve: could not start: port {args.port} is already in use "
            "(choose another with --port)"
        )
    # The app's lifespan refuses keys that cannot read what is stored, but uvicorn tells
    # a refusal there as a traceback: checked here first, it is the command's one line.
    await close_services(await open_services(settings))
    app = create_app(settings, run_worker=not args.no_worker)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=False, lifespan="on"
    )
    deadline = StopDeadline("serve", settings.shutdown_timeout_seconds)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            deadline.arm()
            super().handle_exit(sig, frame)

    server = Server(config)
    # What is built by now lives as long as the process: frozen, the collector's full
    # passes stop walking it, which would otherwise pause every request in flight.
    gc.freeze()
    await server.serve()
    return 0 if server.started else 1


async def cmd_worker(args: argparse.Namespace) -> int:
    from app.logs import configure_logging
    from app.main import close_services, open_services
    from app.worker import build_worker

    settings = settings_from_environment()
    configure_logging(args.log_level)
    stop_exporting = None
    if args.metrics_port is not None:
        from app.metrics import export_worker_metrics

        try:
            stop_exporting = export_worker_metrics(args.metrics_host, args.metrics_port)
        except OSError as error:
            print(
                f"hubline worker: cannot serve metrics on {args.metrics_host}:"
                f"{args.metrics_port}: {error.strerror or error}",
                file=sys.stderr,
            )
            return 1
    resources = await open_services(settings)
    try:
        worker = build_worker(resources, concurrency=args.concurrency)
        deadline = StopDeadline("worker", settings.shutdown_timeout_seconds)
        await worker.run_until_signalled(on_signal=deadline.arm)
    finally:
        await close_services(resources)
        if stop_exporting is not None:
            stop_exporting()
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from alembic.util import CommandError as AlembicError

    from app import db

    settings = load_database_settings()
    path = db.sqlite_path(settings.database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)  # as `hubline serve` does
    engine = db.create_engine(settings.database_url)

    def waiting(error: BaseException) -> None:
        print(
            f"hubline: the database at {db.redacted_url(engine.url)} is not up yet "
            f"({db.error_reason(error)}): waiting up to {args.wait:g} s",
            file=sys.stderr,
        )

    try:
        if args.wait:
            await db.wait_for_database(engine, seconds=args.wait, on_wait=waiting)
        try:
            before = await db.migrate(engine)
        except AlembicError as error:  # the schema's revision is not one it can migrate
            return refuse(f"hubline: the migration failed and changed nothing: {error}")
        except sa.exc.DBAPIError as error:
            if await db.database_trouble(settings.database_url, need_schema=False):
                raise  # the database went away: said in one line, as for every command
            # The database refused a migration's statement (an object already there under
            # a migration's name, say): all of it is rolled back, as one transaction.
            reason = db.error_reason(error)
            return refuse(f"hubline: the migration failed and changed nothing: {reason}")
        after = await db.schema_revision(engine)
    finally:
        await engine.dispose()
    if db.schema_is_ahead(after):
        print(f"schema at {after}, newer than this Hubline's {db.head_revision()}: nothing to do")
    elif before == after:
        print(f"schema already at {after}")
    else:
        print(f"migrated schema from {before or 'empty'} to {after}")
    return 0


# --- keys -------------------------------------------------------------------------


async def cmd_keys_generate(_args: argparse.Namespace) -> int:
    from app.crypto import generate_key

    print("# A new key for TOKEN_ENCRYPTION_KEYS. To rotate: put it first, keep the old")
    print("# ones after it, deploy, then run `hubline keys rotate`.")
    print(generate_key())
    return 0


async def cmd_keys_rotate(_args: argparse.Namespace) -> int:
    from app import db
    from app.crypto import TokenCipher
    from app.vault import count_rows_to_rotate, rotate_keys

    settings = settings_from_environment()
    cipher = TokenCipher.from_setting(settings.token_encryption_keys.get_secret_value())
    engine = db.create_engine(settings.database_url)
    sessions = db.session_factory(engine)
    try:
        async with sessions() as session:
            total = await count_rows_to_rotate(session=session, cipher=cipher)
        progress = Progress(f"re-encrypting under key {cipher.primary_key_id}", total)
        report = await rotate_keys(sessions, cipher, progress=lambda _table, n: progress.advance(n))
        progress.finish()
    finally:
        await engine.dispose()
    details = ", ".join(f"{table} {count}" for table, count in report.changed.items())
    print(f"re-encrypted {report.total} rows under key {cipher.primary_key_id} ({details})")
    return 0


# --- the parser ---------------------------------------------------------------------


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubline",
        description="Hubline connects an AI receptionist to HubSpot. Settings come from the "
        "environment (or a .env file); see README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the web app (and a worker, unless --no-worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="do not run a worker in-process")
    serve.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    serve.set_defaults(run=cmd_serve)

    worker = commands.add_parser("worker", help="run a worker alone (any number may run)")
    worker.add_argument(
        "--concurrency", type=bounded_count(1_000), default=16, help="portals served at once"
    )
    worker.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    worker.add_argument(
        "--metrics-port",
        type=port_number,
        help="serve this worker's own metrics (events handled, HubSpot requests) at "
        "http://HOST:PORT/metrics; the web app's /metrics cannot see another process's",
    )
    worker.add_argument("--metrics-host", default="127.0.0.1", help="with --metrics-port")
    worker.set_defaults(run=cmd_worker)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument(
        "--wait",
        type=wait_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a database that is not up yet (a deploy starting it "
        "alongside); a database that refuses us fails at once",
    )
    migrate.set_defaults(run=cmd_migrate)

    keys = commands.add_parser("keys", help="manage TOKEN_ENCRYPTION_KEYS")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_commands.add_parser("generate", help="print a new key on the last line").set_defaults(
        run=cmd_keys_generate
    )
    key_commands.add_parser(
        "rotate", help="re-encrypt every stored secret under the first key"
    ).set_defaults(run=cmd_keys_rotate, existing_database=True)

    for register in EXTENSIONS:
        register(commands)
    return parser


def run_async(work: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on uvloop (installed with uvicorn[standard]) when present.

    uvloop's event loop and transports cost a fraction of asyncio's per request, and
    every command is a long-lived server or worker whose I/O is its work.
    """

    async def settled() -> _T:
        try:
            return await work
        finally:
            await _sqlite_threads_ended()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - a minimal install without uvicorn's extras
        return asyncio.run(settled())
    return uvloop.run(settled())


async def _sqlite_threads_ended() -> None:
    """Let aiosqlite's connection threads end before the loop closes (a second at most each)."""
    # aiosqlite stops a connection that failed to open without awaiting the stop: its
    # thread answers on this loop afterwards, and finding the loop closed it prints a
    # traceback under the command's own one-line error.
    for thread in threading.enumerate():
        if thread.name.endswith("(_connection_worker_thread)"):
            await asyncio.to_thread(thread.join, 1.0)


# Capabilities add their subcommands here (events, portals, dev, sandbox).
EXTENSIONS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    _load_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Commands that work on what is stored declare `existing_database`: connecting to
        # a SQLite file that is not there would create an empty one (a typo in
        # DATABASE_URL then leaves a stray file and advice to migrate it).
        if getattr(args, "existing_database", False):
            missing = _missing_database()
            if missing is not None:
                print(f"hubline: {missing}", file=sys.stderr)
                return 1
        return int(run_async(args.run(args)))
    except ConfigurationError as error:
        print(f"hubline: {error}", file=sys.stderr)
        return 2
    except CryptoError as error:
        print(f"hubline: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        trouble = _database_trouble(args, error)
        if trouble is None:
            raise
        print(f"hubline: {trouble}", file=sys.stderr)
        return 1


def _missing_database() -> str | None:
    from app import db

    # Every setting, not DATABASE_URL alone: a bad one is the error to say first.
    return db.missing_sqlite_file(settings_from_environment().database_url)


def _database_trouble(args: argparse.Namespace, error: Exception) -> str | None:
    """One line on why the database failed the command, if it is the database's state."""
    # Unreachable, or its schema missing or behind: not a fault a traceback should show.
    from app import db

    if not isinstance(error, db.DATABASE_ERRORS):
        return None
    database_url = load_database_settings().database_url
    # `migrate` is what makes the schema: only whether it can reach the database counts.
    return run_async(db.database_trouble(database_url, need_schema=args.run is not cmd_migrate))


def _load_extensions() -> None:
    import importlib

    for module in ("app.inbox_cli", "app.portals_cli", "app.dev"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def port_is_free(host: str, port: int) -> bool:
    """False when another process listens on host:port (any other trouble is uvicorn's to say)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError):
        return True
    # The host's own family: an IPv4 socket cannot even try "::".
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.errno != errno.EADDRINUSE
    return True


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def refuse(message: str) -> int:
    """Say why a command did nothing, on stderr (stdout may be a script's JSON), and fail."""
    print(message, file=sys.stderr)
    return 1


def row_id(text: str) -> int:
    """An argparse type for portal and event ids: what the database can hold, or a clear error."""
    from app.db import MAX_BIGINT, parse_id

    value = parse_id(text.strip())
    if value is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an id (a whole number, 0 to {MAX_BIGINT})"
        )
    return value


def bounded_count(most: int) -> Callable[[str], int]:
    """An argparse type for a count from 1 to `most`."""

    def count(text: str) -> int:
        if not (text.strip().isascii() and text.strip().isdigit()) or not 1 <= int(text) <= most:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to {most}")
        return int(text)

    return count


def wait_seconds(text: str) -> float:
    """An argparse type for a wait: from 0 to an hour of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3_600:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return value


def port_number(text: str) -> int:
    """An argparse type for a TCP port (uvicorn would bind 112986 as 112986 - 65536)."""
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65_535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)
