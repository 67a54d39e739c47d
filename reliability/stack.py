"""The real processes a run drives: PostgreSQL, the sandbox HubSpot, `hubline serve`, workers.

Every process is started in its own session and remembered by its pid, so a run can
SIGKILL one worker without touching anything else, and `Processes.stop_all` ends every
process the run started, even when the run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from app import db
from app.crypto import generate_key
from app.sandbox.testing import approve

CLIENT_ID = "reliability-client-id"
CLIENT_SECRET = "reliability-client-secret-0123456789"  # noqa: S105 - the sandbox's own app
ADMIN_TOKEN = "reliability-admin-token-0123456789"  # noqa: S105 - a throwaway console token
HUBLINE = [sys.executable, "-m", "app"]  # `python -m app` is `hubline`
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessExited(RuntimeError):
    pass


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout: float, what: str, every: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except ProcessExited:
            raise
        except Exception:  # noqa: S110 - not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)


# --- PostgreSQL -----------------------------------------------------------------------------


@dataclass
class Postgres:
    """The throwaway server `reliability/run` (or scripts/test) provisioned."""

    admin_url: str
    bindir: str = ""
    data_dir: str = ""
    options: str = ""
    run_as: str = ""

    @classmethod
    def from_environment(cls) -> Postgres:
        url = os.environ.get("HUBLINE_TEST_POSTGRES_URL", "")
        if not url:
            raise RuntimeError("HUBLINE_TEST_POSTGRES_URL is unset: run reliability/run")
        return cls(
            admin_url=url,
            bindir=os.environ.get("HUBLINE_TEST_PG_BINDIR", ""),
            data_dir=os.environ.get("HUBLINE_TEST_PG_DATA", ""),
            options=os.environ.get("HUBLINE_TEST_PG_OPTIONS", ""),
            run_as=os.environ.get("HUBLINE_TEST_PG_USER", ""),
        )

    @property
    def controllable(self) -> bool:
        return bool(self.bindir and self.data_dir and self.options)

    def url_for(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(False)

    async def _admin(self, *statements: str) -> list[Any]:
        engine = db.create_engine(
            self.url_for("postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        results = []
        try:
            async with engine.connect() as connection:
                for statement in statements:
                    result = await connection.execute(sa.text(statement))
                    results.append(result.all() if result.returns_rows else [])
        finally:
            await engine.dispose()
        return results

    async def create_database(self, prefix: str) -> str:
        """A new, migrated database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        await self._admin(f'CREATE DATABASE "{name}"')
        url = self.url_for(name)
        engine = db.create_engine(url, poolclass=sa.NullPool)
        try:
            await db.migrate(engine)
        finally:
            await engine.dispose()
        return url

    async def drop_database(self, url: str) -> None:
        name = make_url(url).database
        with contextlib.suppress(Exception):
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def connections(self, url: str) -> int:
        """Open connections to this database (pg_stat_activity)."""
        name = make_url(url).database
        [rows] = await self._admin(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'"  # noqa: S608
        )
        return int(rows[0][0])

    def _pg_ctl(self, *args: str) -> None:
        command = [f"{self.bindir}/pg_ctl", "-D", self.data_dir, *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        """Stop the server at once, as a crash or a failover would."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        log = str(Path(self.data_dir).parent / "server.log")
        self._pg_ctl("-l", log, "-w", "-t", "60", "-o", self.options, "start")


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Processes:
    """Every process a run starts; `stop_all` ends them by pid."""

    log_dir: Path
    started: list[Proc] = field(default_factory=list)
    counter: int = 0

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self.counter += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.counter:03d}-{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                env=env,
                cwd=self.log_dir,  # no stray .env is read
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.started.append(proc)
        return proc

    def kill(self, proc: Proc, signum: int = signal.SIGKILL) -> None:
        if proc.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)

    def terminate(self, proc: Proc, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if not proc.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(proc)

    def stop_all(self) -> None:
        alive = [proc for proc in self.started if proc.alive]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in alive:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)


# --- the stack ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstalledPortal:
    portal_id: int
    secret: str
    webhook_url: str
    session_cookie: str


WorkerKind = str  # "hubline" | "short-lease" | "broken"


@dataclass
class Stack:
    """A sandbox HubSpot, `hubline serve --no-worker` and any number of workers on one database."""

    processes: Processes
    database_url: str
    portal_ids: list[int]
    key: str = field(default_factory=generate_key)
    journal_poll_seconds: int = 0
    worker_lease_seconds: float = 3.0  # for "short-lease" and "broken" workers
    worker_concurrency: int = 16
    sandbox_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    sandbox: Proc | None = None
    web: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    installed: dict[int, InstalledPortal] = field(default_factory=dict)

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def env(self, **extra: str) -> dict[str, str]:
        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HUBSPOT_", "TOKEN_", "DATABASE_", "ADMIN_", "PUBLIC_"))
        }
        return {
            **keep,
            "DATABASE_URL": self.database_url,
            "HUBSPOT_CLIENT_ID": CLIENT_ID,
            "HUBSPOT_CLIENT_SECRET": CLIENT_SECRET,
            "HUBSPOT_API_URL": self.sandbox_url,
            "HUBSPOT_AUTH_URL": self.sandbox_url,
            "PUBLIC_URL": self.web_url,
            "TOKEN_ENCRYPTION_KEYS": self.key,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "JOURNAL_POLL_SECONDS": str(self.journal_poll_seconds),
            "PYTHONUNBUFFERED": "1",
            # Processes run in their log directory (so no stray .env is read) yet import
            # this checkout's `app` and `reliability`.
            "PYTHONPATH": str(ROOT),
            **extra,
        }

    async def start_sandbox(self, *, retry_after: bool = True) -> None:
        argv = [
            sys.executable,
            "-m",
            "reliability.sandbox_server",
            "--port",
            str(self.sandbox_port),
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--portals",
            ",".join(str(p) for p in self.portal_ids),
        ]
        if retry_after:
            argv.append("--retry-after")
        self.sandbox = self.processes.start("sandbox", argv, self.env())
        await wait_for(self._answers(self.sandbox, "/_sandbox/state"), timeout=60, what="sandbox")

    async def start_web(self) -> None:
        argv = [*HUBLINE, "serve", "--no-worker", "--port", str(self.web_port)]
        self.web = self.processes.start("serve", [*argv, "--log-level", "warning"], self.env())
        await wait_for(self._answers(self.web, "/healthz"), timeout=60, what="hubline serve")

    def start_worker(self, kind: WorkerKind = "hubline") -> Proc:
        if kind == "hubline":
            argv = [*HUBLINE, "worker", "--concurrency", str(self.worker_concurrency)]
            argv += ["--log-level", "warning"]
        else:
            argv = [sys.executable, "-m", "reliability.worker"]
            argv += ["--lease-seconds", str(self.worker_lease_seconds)]
            argv += ["--concurrency", str(self.worker_concurrency)]
            if kind == "broken":
                argv.append("--broken")
        proc = self.processes.start(f"worker-{kind}", argv, self.env())
        self.workers.append(proc)
        return proc

    def live_workers(self) -> list[Proc]:
        return [proc for proc in self.workers if proc.alive]

    def _answers(self, proc: Proc, path: str) -> Callable[[], Awaitable[bool]]:
        base = self.sandbox_url if proc is self.sandbox else self.web_url

        async def check() -> bool:
            if not proc.alive:
                raise ProcessExited(f"{proc.name} exited; see {proc.log_path}")
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(base + path)).status_code == 200

        return check

    async def install_all(self) -> None:
        for portal_id in self.portal_ids:
            self.installed[portal_id] = await install_portal(self, portal_id)

    async def sandbox_post(self, path: str, body: dict[str, Any]) -> Any:
        async with httpx.AsyncClient(base_url=self.sandbox_url, timeout=30) as client:
            response = await client.post(path, json=body)
            response.raise_for_status()
            return response.json()

    async def sandbox_get(self, path: str, **params: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.sandbox_url, timeout=60) as client:
            response = await client.get(path, params=params)
            response.raise_for_status()
            return response.json()


def page_value(page: str, testid: str) -> str:
    match = re.search(rf'data-testid="{re.escape(testid)}"[^>]*>([^<]*)<', page)
    if match is None:
        raise RuntimeError(f"no data-testid={testid!r} on the settings page")
    return html.unescape(match.group(1)).strip()


async def install_portal(stack: Stack, portal_id: int) -> InstalledPortal:
    """Install through the real redirects: /oauth/install → sandbox Approve → /oauth/callback."""
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as browser:
        started = await browser.get("/oauth/install")
        if started.status_code != 302:
            raise RuntimeError(f"/oauth/install answered {started.status_code}")
        page = await browser.get(await approve(browser, started.headers["location"], portal_id))
        if page.status_code != 200:
            raise RuntimeError(f"/oauth/callback answered {page.status_code}: {page.text[:300]}")
        return InstalledPortal(
            portal_id=portal_id,
            secret=page_value(page.text, "webhook-secret"),
            webhook_url=page_value(page.text, "webhook-url"),
            session_cookie=browser.cookies.get("hubline_portal") or "",
        )


@contextlib.asynccontextmanager
async def running_stack(
    postgres: Postgres,
    log_dir: Path,
    portal_ids: list[int],
    *,
    database_url: str | None = None,
    **options: Any,
) -> AsyncIterator[Stack]:
    """A fresh database (unless given one), the sandbox and `hubline serve`; all stopped after."""
    processes = Processes(log_dir)
    url = database_url or await postgres.create_database("reliability")
    stack = Stack(processes=processes, database_url=url, portal_ids=portal_ids, **options)
    try:
        await stack.start_sandbox()
        await stack.start_web()
        yield stack
    finally:
        processes.stop_all()
        if database_url is None:
            await postgres.drop_database(url)
