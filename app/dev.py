"""`hubline dev` and `hubline sandbox`: Hubline with a local HubSpot, zero configuration.

`hubline dev` is the only command that invents credentials and keys. It keeps them
in a git-ignored file (`.hubline-dev.env`) so a restart keeps the installed portals
readable. Each start also writes there where the stack runs (its database and URLs), so
other `hubline` commands reach it given the file's values:
`set -a; . ./.hubline-dev.env; set +a; hubline portals list`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvicorn
from sqlmodel import col

from app import cli, db
from app.crypto import TokenCipher, generate_key
from app.models import Portal, PortalStatus, utcnow
from app.portals import current_secret
from app.settings import Settings, configured_environment

DEV_FILE = ".hubline-dev.env"
# Where a running dev stack is: rewritten at each start, never read back by `hubline dev`.
STACK_SETTINGS = ("DATABASE_URL", "HUBSPOT_API_URL", "HUBSPOT_AUTH_URL", "PUBLIC_URL")
DEV_DATABASE = "sqlite+aiosqlite:///./hubline-dev.db"
DEMO_POLL_SECONDS = 2.0

log = logging.getLogger(__name__)


def read_dev_values(path: Path) -> dict[str, str]:
    """What the dev file holds ({} when there is none); never writes it."""
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                values[name.strip()] = _unquoted(value.strip())
    return values


def load_or_create_dev_values(path: Path) -> dict[str, str]:
    """The dev credentials and key, generated on first use and kept in `path` (mode 0600)."""
    values = read_dev_values(path)
    wanted: dict[str, Callable[[], str]] = {
        "HUBSPOT_CLIENT_ID": lambda: f"hubline-dev-{secrets.token_hex(6)}",
        "HUBSPOT_CLIENT_SECRET": lambda: secrets.token_urlsafe(32),
        "HUBSPOT_APP_ID": lambda: str(secrets.randbelow(9_000_000) + 1_000_000),
        "TOKEN_ENCRYPTION_KEYS": generate_key,
        "ADMIN_TOKEN": lambda: secrets.token_urlsafe(24),
    }
    missing = {name: make() for name, make in wanted.items() if not values.get(name)}
    if missing:
        values.update(missing)
        _write_dev_file(path, values)
    return {name: value for name, value in values.items() if name not in STACK_SETTINGS}


def remember_stack(path: Path, dev: dict[str, str], stack: dict[str, str]) -> None:
    """Add where this dev stack runs to the dev file, for other `hubline` commands."""
    _write_dev_file(path, {**dev, **{name: stack[name] for name in STACK_SETTINGS}})


def _write_dev_file(path: Path, values: dict[str, str]) -> None:
    lines = ["# Made by `hubline dev` for the local sandbox only. Never use these in production."]
    # Quoted for the shell that sources the file (a folder with a space, a URL with a &).
    lines += [
        f"{name}={shlex.quote(value)}"
        for name, value in values.items()
        if name not in STACK_SETTINGS
    ]
    stack = [f"{name}={shlex.quote(values[name])}" for name in STACK_SETTINGS if name in values]
    if stack:
        lines.append("# Where the dev stack last started (for `set -a; . ./<this file>`).")
        lines += stack
    # Written beside it and renamed over it: a command sourcing the file meanwhile reads
    # the old one or the new one, never an empty one. Private from its first byte.
    fresh = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(fresh, path)


def _unquoted(value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError:  # an unbalanced quote: not written by us, taken as it is
        return value
    return words[0] if len(words) == 1 else value


def _absolute_sqlite(database_url: str) -> str:
    """A SQLite URL whose path does not depend on the folder a command runs in."""
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return database_url
    return url.set(database=str(Path(url.database).resolve())).render_as_string(hide_password=False)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `hubline dev` (it runs two at once)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def cmd_dev(args: argparse.Namespace) -> int:
    from app.logs import configure_logging
    from app.main import create_app
    from app.sandbox import SandboxConfig, create_sandbox_app
    from app.settings import load_settings

    configure_logging(args.log_level)
    dev = load_or_create_dev_values(Path(args.dev_file))
    hubline_url = f"http://{args.host}:{args.port}"
    sandbox_url = f"http://{args.host}:{args.sandbox_port}"
    # What `hubline serve` and the other commands in this folder read (a `.env` too), so
    # they see what the dev stack does; the generated credentials and the stack's own
    # addresses win.
    given = configured_environment()
    environ = {
        **given,
        **dev,
        "HUBSPOT_API_URL": sandbox_url,
        "HUBSPOT_AUTH_URL": sandbox_url,
        "PUBLIC_URL": hubline_url,
        "DATABASE_URL": given.get("DATABASE_URL", DEV_DATABASE),
        "JOURNAL_POLL_SECONDS": given.get("JOURNAL_POLL_SECONDS", "5"),
    }
    settings = load_settings(environ)
    sandbox_config = SandboxConfig(
        client_id=settings.hubspot_client_id,
        client_secret=settings.hubspot_client_secret.get_secret_value(),
        app_id=int(dev["HUBSPOT_APP_ID"]),
        public_url=sandbox_url,
        redirect_uris=[settings.redirect_uri],
        webhook_target_url=f"{hubline_url}/webhooks/hubspot",
    )
    servers = [
        _Server(
            uvicorn.Config(
                create_app(settings, run_worker=True),
                host=args.host,
                port=args.port,
                log_config=None,
                access_log=False,
            )
        ),
        _Server(
            uvicorn.Config(
                create_sandbox_app(sandbox_config),
                host=args.host,
                port=args.sandbox_port,
                log_config=None,
                access_log=False,
            )
        ),
    ]

    deadline = cli.StopDeadline("dev", settings.shutdown_timeout_seconds)

    def stop() -> None:
        deadline.arm()
        for server in servers:
            server.should_exit = True

    # Read before the worker starts: it soon finds their tokens refused and uninstalls them.
    started_at = utcnow()
    earlier = await _installed_before(settings, started_at)
    ports = (args.port, args.sandbox_port)
    busy = [port for port in ports if not cli.port_is_free(args.host, port)]
    if busy:
        print(
            f"hubline dev: could not start: port {busy[0]} is already in use "
            "(choose others with --port and --sandbox-port)",
            file=sys.stderr,
        )
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    running = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):
        if any(task.done() for task in running):
            stop()
            await asyncio.gather(*running, return_exceptions=True)
            print("hubline dev: could not start (is a port already in use?)", file=sys.stderr)
            return 1
        await asyncio.sleep(0.05)
    stack = {**environ, "DATABASE_URL": _absolute_sqlite(environ["DATABASE_URL"])}
    remember_stack(Path(args.dev_file), dev, stack)
    print_banner(hubline_url, sandbox_url, Path(args.dev_file), demo=args.demo, earlier=earlier)
    demo = (
        asyncio.create_task(demo_loop(settings, hubline_url, installed_since=started_at))
        if args.demo
        else None
    )
    await asyncio.gather(*running)
    if demo is not None:
        demo.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await demo
    return 0


async def _installed_before(settings: Settings, started_at: datetime) -> list[int]:
    """Portals installed in an earlier run: the new sandbox, which starts empty, knows none."""
    path = db.sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        return []  # a first run (and no empty file made by asking)
    engine = db.create_engine(settings.database_url)
    try:
        async with db.session_factory(engine)() as session:
            rows = await session.execute(
                sa.select(col(Portal.portal_id))
                .where(col(Portal.status) != PortalStatus.uninstalled)
                .where(col(Portal.installed_at) < started_at)
                .order_by(col(Portal.portal_id))
            )
            return list(rows.scalars())
    except db.DATABASE_ERRORS:
        return []  # not migrated yet: nothing was installed
    finally:
        await engine.dispose()


def print_banner(
    hubline_url: str, sandbox_url: str, dev_file: Path, *, demo: bool, earlier: list[int]
) -> None:
    # `.` looks a bare file name up on PATH: name it by its folder.
    sourced = str(dev_file) if "/" in str(dev_file) else f"./{dev_file}"
    # The command as this process was started: `hubline` itself need not be on PATH.
    started_as = Path(sys.argv[0])
    command = shlex.quote(str(started_as.resolve())) if started_as.name == "hubline" else "hubline"
    lines = [
        "",
        "Hubline is running with a local HubSpot sandbox.",
        f"  1. Open {hubline_url}/ and click Install.",
        "  2. Approve one of the sandbox portals.",
        "  3. The settings page shows the receptionist webhook URL and secret.",
        f"  Sandbox HubSpot (contacts, timelines, API traffic): {sandbox_url}/",
        f"  Admin console: {hubline_url}/admin (ADMIN_TOKEN is in {dev_file})",
        f"  Other hubline commands: set -a; . {sourced}; set +a; {command} portals list",
    ]
    if earlier:
        lines.append(
            "  The sandbox starts empty each time: install again portal(s) "
            f"{', '.join(str(p) for p in earlier)} from an earlier run (until then their"
            " events wait, parked)."
        )
    if demo:
        lines.append("  Demo: realistic receptionist events go to every portal you install.")
    print("\n".join(lines) + "\n", flush=True)


async def demo_loop(settings: Settings, hubline_url: str, *, installed_since: datetime) -> None:
    """Send the demo events to each portal once, as soon as it is installed (in this run:
    one installed in an earlier run is unknown to this run's sandbox until installed again)."""
    from app.demo import send_demo

    sent: set[int] = set()
    engine = db.create_engine(settings.database_url)
    sessions = db.session_factory(engine)
    cipher = TokenCipher.from_setting(settings.token_encryption_keys.get_secret_value())
    try:
        while True:
            targets: list[tuple[int, str]] = []
            async with sessions() as session:
                rows = await session.execute(
                    sa.select(col(Portal.portal_id))
                    .where(col(Portal.status) == PortalStatus.active)
                    .where(col(Portal.installed_at) >= installed_since)
                )
                for portal_id in rows.scalars():
                    if portal_id in sent:
                        continue
                    secret = await current_secret(portal_id, session=session, cipher=cipher)
                    if secret is not None:
                        targets.append((portal_id, secret.reveal()))
            if targets:
                count = await send_demo(hubline_url, targets)
                sent.update(portal_id for portal_id, _ in targets)
                print(
                    f"demo: sent {count} receptionist events to portal(s) "
                    f"{', '.join(str(p) for p, _ in targets)}",
                    flush=True,
                )
            await asyncio.sleep(DEMO_POLL_SECONDS)
    finally:
        await engine.dispose()


async def cmd_sandbox(args: argparse.Namespace) -> int:
    from app.logs import configure_logging
    from app.sandbox import SandboxConfig, serve_sandbox

    configure_logging(args.log_level)
    dev_file = Path(args.dev_file)
    # The sandbox alone never invents credentials, nor touches the dev file: it reuses
    # what `hubline dev` made, if anything, and the settings Hubline itself reads.
    dev = read_dev_values(dev_file)
    given = configured_environment()
    client_id = args.client_id or given.get("HUBSPOT_CLIENT_ID") or dev.get("HUBSPOT_CLIENT_ID")
    client_secret = (
        args.client_secret or given.get("HUBSPOT_CLIENT_SECRET") or dev.get("HUBSPOT_CLIENT_SECRET")
    )
    config = SandboxConfig(public_url=f"http://{args.host}:{args.port}")
    if client_id:
        config.client_id = client_id
    if client_secret:
        config.client_secret = client_secret
    # Signed with another app id, every webhook would be ignored by a Hubline that checks it.
    app_id = given.get("HUBSPOT_APP_ID") or dev.get("HUBSPOT_APP_ID") or ""
    if app_id.strip().isascii() and app_id.strip().isdigit():
        config.app_id = int(app_id)
    if args.webhook_target:
        config.webhook_target_url = args.webhook_target
    if not cli.port_is_free(args.host, args.port):
        return cli.refuse(
            f"hubline sandbox: could not start: port {args.port} is already in use "
            "(choose another with --port)"
        )
    print(
        f"HubSpot sandbox at http://{args.host}:{args.port}/ (client id {config.client_id})",
        flush=True,
    )
    with contextlib.suppress(asyncio.CancelledError):
        await serve_sandbox(config, host=args.host, port=args.port)
    return 0


def register(commands: Any) -> None:
    dev = commands.add_parser(
        "dev", help="run Hubline, its worker and a local HubSpot sandbox with zero configuration"
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=cli.port_number, default=8000)
    dev.add_argument("--sandbox-port", type=cli.port_number, default=8090)
    dev.add_argument("--demo", action="store_true", help="send demo events to installed portals")
    dev.add_argument("--dev-file", default=DEV_FILE, help="where the generated credentials live")
    dev.add_argument("--log-level", default="warning", type=str.lower, choices=cli.LOG_LEVELS)
    dev.set_defaults(run=cmd_dev)

    sandbox = commands.add_parser("sandbox", help="run the local HubSpot sandbox alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=cli.port_number, default=8090)
    sandbox.add_argument("--client-id", help="the app's client id (default: HUBSPOT_CLIENT_ID)")
    sandbox.add_argument("--client-secret", help="default: HUBSPOT_CLIENT_SECRET")
    sandbox.add_argument("--webhook-target", help="where to deliver HubSpot webhooks")
    sandbox.add_argument("--dev-file", default=DEV_FILE)
    sandbox.add_argument("--log-level", default="warning", type=str.lower, choices=cli.LOG_LEVELS)
    sandbox.set_defaults(run=cmd_sandbox)


cli.EXTENSIONS.append(register)
