"""What every measurement needs: processes on free ports, databases, installs, sandbox reads.

Every server runs in a process of its own and is reached over real HTTP on 127.0.0.1.
`Stack` stops whatever it started (SIGTERM, then SIGKILL) even when a measurement fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from app import db
from app.crypto import generate_key
from app.sandbox.testing import approve

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"

CLIENT_ID = "bench-client-id"
CLIENT_SECRET = "bench-client-secret-0123456789"  # a throwaway credential for the sandbox
# One key for the whole run, so the driver can read what the servers encrypted.
BENCH_KEY = generate_key()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mib(pid: int | str) -> float:
    """Resident memory of a process (a pid, or "self") in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Proc:
    """A server or helper process the benchmark started."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    """Starts processes and stops them all, newest first, on exit."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._procs: list[Proc] = []

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for proc in reversed(self._procs):
            await stop(proc)
        self._procs.clear()

    async def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        url: str = "",
        ready_path: str | None = None,
        timeout: float = 60.0,
    ) -> Proc:
        """Start `args` from the repository root; wait until `url + ready_path` answers."""
        log_path = self.work_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *args,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # a Ctrl-C at the terminal reaches only us
            )
        proc = Proc(name, process, log_path, url)
        self._procs.append(proc)
        if ready_path is not None:
            await wait_ready(proc, url + ready_path, timeout=timeout)
        return proc

    async def stop(self, proc: Proc) -> None:
        await stop(proc)
        if proc in self._procs:
            self._procs.remove(proc)


async def wait_ready(proc: Proc, url: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.process.returncode is not None:
                raise RuntimeError(f"{proc.name} exited at start-up:\n{proc.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(
        f"{proc.name} did not answer {url} within {timeout:.0f}s:\n{proc.log_tail()}"
    )


async def stop(proc: Proc, timeout: float = 30.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after `timeout`."""
    if proc.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.process.kill()
        await proc.process.wait()


# --- servers ------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """The HubSpot sandbox server and a client for its inspection endpoints."""

    proc: Proc
    url: str
    http: httpx.AsyncClient

    async def settings(self, **values: Any) -> dict[str, Any]:
        answer = await self.http.post(f"{self.url}/_sandbox/settings", json=values)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    async def request_counts(self, portal_id: int) -> Counter[tuple[str, int]]:
        """Requests so far for a portal, by (endpoint, status)."""
        answer = await self.http.get(
            f"{self.url}/_sandbox/requests", params={"portal_id": portal_id, "limit": 1}
        )
        answer.raise_for_status()
        return Counter(
            {(c["endpoint"], int(c["status"])): int(c["count"]) for c in answer.json()["counts"]}
        )

    async def request_log(self, portal_id: int, *, since: float) -> list[dict[str, Any]]:
        """The portal's logged requests from `since` (epoch seconds) on (the log keeps 5,000)."""
        answer = await self.http.get(
            f"{self.url}/_sandbox/requests", params={"portal_id": portal_id, "limit": 5000}
        )
        answer.raise_for_status()
        return [r for r in answer.json()["requests"] if r["at"] >= since]

    async def refresh_count(self, portal_id: int) -> int:
        answer = await self.http.get(f"{self.url}/_sandbox/counts")
        answer.raise_for_status()
        return int(answer.json()["refresh"].get(str(portal_id), 0))

    async def portal_summary(self, portal_id: int) -> dict[str, Any]:
        answer = await self.http.get(f"{self.url}/_sandbox/state")
        answer.raise_for_status()
        for summary in answer.json()["portals"]:
            if summary["portal_id"] == portal_id:
                result: dict[str, Any] = summary
                return result
        raise KeyError(portal_id)

    async def expire_tokens(self, portal_id: int) -> int:
        answer = await self.http.post(f"{self.url}/_sandbox/portals/{portal_id}/expire-tokens")
        answer.raise_for_status()
        return int(answer.json()["expired"])


async def start_sandbox(
    stack: Stack, http: httpx.AsyncClient, *, latency: float, search_lag: float = 0.0
) -> Sandbox:
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = await stack.start(
        "sandbox",
        [
            PYTHON,
            "-m",
            "benchmarks.servers",
            "sandbox",
            "--port",
            str(port),
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--latency",
            str(latency),
            "--search-lag",
            str(search_lag),
        ],
        url=url,
        ready_path="/_sandbox/settings",
    )
    return Sandbox(proc, url, http)


def hubline_environment(*, database_url: str, sandbox_url: str, public_url: str) -> dict[str, str]:
    """The settings `hubline serve` reads, pointing HubSpot at the sandbox."""
    return {
        "DATABASE_URL": database_url,
        "HUBSPOT_CLIENT_ID": CLIENT_ID,
        "HUBSPOT_CLIENT_SECRET": CLIENT_SECRET,
        "HUBSPOT_API_URL": sandbox_url,
        "HUBSPOT_AUTH_URL": sandbox_url,
        "PUBLIC_URL": public_url,
        "TOKEN_ENCRYPTION_KEYS": BENCH_KEY,
        # Nothing here tests the journal; polling it would only add noise.
        "JOURNAL_POLL_SECONDS": "0",
    }


async def start_hubline(
    stack: Stack,
    name: str,
    *,
    database_url: str,
    sandbox_url: str,
    worker: bool = True,
    log_level: str = "warning",
) -> Proc:
    """`hubline serve` on a free port (with its in-process worker unless `worker=False`)."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    args = [PYTHON, "-m", "app", "serve", "--host", HOST, "--port", str(port)]
    args += ["--log-level", log_level]
    if not worker:
        args.append("--no-worker")
    env = hubline_environment(database_url=database_url, sandbox_url=sandbox_url, public_url=url)
    return await stack.start(name, args, env=env, url=url, ready_path="/healthz")


async def start_worker(
    stack: Stack,
    name: str,
    *,
    database_url: str,
    sandbox_url: str,
    public_url: str,
    stats: Path | None = None,
) -> Proc:
    """`hubline worker`: a worker process alone, as deployments run them; with `stats`, under
    `benchmarks.probe`, which writes its statement count, CPU and memory there at exit."""
    env = hubline_environment(
        database_url=database_url, sandbox_url=sandbox_url, public_url=public_url
    )
    command = ["worker", "--log-level", "warning"]
    if stats is None:
        return await stack.start(name, [PYTHON, "-m", "app", *command], env=env)
    probe = [PYTHON, "-m", "benchmarks.probe", "--stats", str(stats), "--", *command]
    return await stack.start(name, probe, env=env)


async def start_bare(stack: Stack) -> Proc:
    port = free_port()
    url = f"http://{HOST}:{port}"
    return await stack.start(
        "bare",
        [PYTHON, "-m", "benchmarks.servers", "bare", "--port", str(port)],
        url=url,
        ready_path="/healthz",
    )


async def start_bound(stack: Stack, *, database_url: str, secret: str) -> Proc:
    """benchmarks/intake_bound.py on the SQLite file of `database_url` (migrated)."""
    port = free_port()
    return await stack.start(
        "bound",
        [
            PYTHON,
            "-m",
            "benchmarks.servers",
            "bound",
            "--port",
            str(port),
            "--database-path",
            make_url(database_url).database or "",
        ],
        env={"BOUND_SECRET": secret, "TOKEN_ENCRYPTION_KEYS": BENCH_KEY},
        url=f"http://{HOST}:{port}",
        ready_path="/healthz",
    )


# --- databases ------------------------------------------------------------------------


@dataclass
class Databases:
    """Fresh databases for each measurement: SQLite files, and PostgreSQL when configured."""

    work_dir: Path
    postgres_admin_url: str = ""
    _created: list[str] = field(default_factory=list)

    @property
    def has_postgres(self) -> bool:
        return bool(self.postgres_admin_url)

    def sqlite(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{self.work_dir / name}.db"

    async def postgres(self, name: str) -> str:
        """A new, empty, migrated PostgreSQL database."""
        database = f"bench_{name}_{uuid.uuid4().hex[:8]}"
        await self._admin(f'CREATE DATABASE "{database}"')
        self._created.append(database)
        url = (
            make_url(self.postgres_admin_url)
            .set(database=database)
            .render_as_string(hide_password=False)
        )
        await migrate(url)
        return url

    async def fresh(self, kind: str, name: str) -> str:
        """A fresh database of `kind` ("sqlite" or "postgres"), migrated."""
        if kind == "postgres":
            return await self.postgres(name)
        url = self.sqlite(name)
        await migrate(url)
        return url

    async def drop_all(self) -> None:
        for database in self._created:
            with contextlib.suppress(Exception):
                await self._admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self._created.clear()

    async def _admin(self, statement: str) -> None:
        engine = db.create_engine(
            self.postgres_admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        try:
            async with engine.connect() as connection:
                await connection.execute(sa.text(statement))
        finally:
            await engine.dispose()


async def migrate(database_url: str) -> None:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def engine_for(database_url: str) -> AsyncIterator[Any]:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        yield engine
    finally:
        await engine.dispose()


async def scalar(database_url: str, query: str, **params: Any) -> Any:
    async with engine_for(database_url) as engine, engine.connect() as connection:
        return (await connection.execute(sa.text(query), params)).scalar()


# --- installing portals -------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    portal_id: int
    webhook_url: str
    webhook_secret: str


def _page_value(page: str, testid: str) -> str:
    match = re.search(rf'data-testid="{re.escape(testid)}"[^>]*>([^<]*)<', page)
    if match is None:
        raise RuntimeError(f"the settings page has no {testid}")
    return html.unescape(match.group(1)).strip()


async def install_portal(hubline_url: str, sandbox_url: str, portal_id: int) -> Installed:
    """Install a sandbox portal into Hubline the way an admin does: /oauth/install → approve →
    /oauth/callback, over HTTP, with cookies kept as a browser keeps them (a new browser
    for each install: each portal has its own admin)."""
    async with httpx.AsyncClient(timeout=60.0) as browser:
        return await _install(browser, hubline_url, sandbox_url, portal_id)


async def _install(
    http: httpx.AsyncClient, hubline_url: str, sandbox_url: str, portal_id: int
) -> Installed:
    started = await http.get(f"{hubline_url}/oauth/install")
    if started.status_code != 302:
        raise RuntimeError(f"/oauth/install answered {started.status_code}")
    page = await http.get(await approve(http, started.headers["location"], portal_id))
    if page.status_code != 200:
        raise RuntimeError(f"/oauth/callback answered {page.status_code}: {page.text[:300]}")
    return Installed(
        portal_id=portal_id,
        webhook_url=_page_value(page.text, "webhook-url"),
        webhook_secret=_page_value(page.text, "webhook-secret"),
    )


async def sandbox_tokens(
    http: httpx.AsyncClient, sandbox_url: str, portal_id: int
) -> dict[str, Any]:
    """Tokens for a portal straight from the sandbox's OAuth flow (approve, then code grant)."""
    redirect_uri = "http://127.0.0.1/oauth/callback"
    approved = await http.post(
        f"{sandbox_url}/oauth/authorize/approve",
        data={
            "client_id": CLIENT_ID,
            "redirect_uri": redirect_uri,
            "scope": "oauth crm.objects.contacts.read crm.objects.contacts.write "
            "crm.schemas.contacts.read crm.schemas.contacts.write",
            "state": "bench",
            "portal_id": str(portal_id),
        },
    )
    if approved.status_code != 302:
        raise RuntimeError(f"the sandbox's approve answered {approved.status_code}")
    code = dict(parse_qsl(urlsplit(approved.headers["location"]).query))["code"]
    answer = await http.post(
        f"{sandbox_url}/oauth/v3/token",
        data={
            "grant_type": "authorization_code",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uri": redirect_uri,
            "code": code,
        },
    )
    answer.raise_for_status()
    tokens: dict[str, Any] = answer.json()
    return tokens


async def wait_for(predicate: Any, *, timeout: float, every: float = 0.25) -> bool:
    """Poll an async predicate until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(every)
    return False


def as_utc(value: Any) -> datetime:
    """A timestamp read with plain SQL: SQLite hands back naive text (in UTC)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    moment: datetime = value if value.tzinfo else value.replace(tzinfo=UTC)
    return moment


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of `values`; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
