"""The web application: `create_app(settings)` builds it from plain data."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from app import db
from app.crypto import TokenCipher
from app.errors import UnknownKeyError
from app.hubspot.runtime import HubSpotRuntime
from app.inbox import InboxWriter
from app.logs import install_redaction
from app.middleware import RequestContextMiddleware
from app.portals import PortalCache
from app.settings import Settings

log = logging.getLogger(__name__)

HTTP_TIMEOUT = httpx.Timeout(20.0, connect=5.0)


@dataclass
class Services:
    """The long-lived resources every route and handler reaches, created in the lifespan."""

    settings: Settings
    engine: AsyncEngine
    sessions: db.SessionFactory
    http: httpx.AsyncClient
    cipher: TokenCipher
    # Each portal's status and decrypted receptionist secrets, for webhook intake.
    portals: PortalCache
    # Webhook intake's inbox writes: concurrent requests' events share one commit.
    inbox_writer: InboxWriter
    # Per-process HubSpot state: refresh locks, rate budgets, backoff, the app token.
    hubspot: HubSpotRuntime = field(default_factory=HubSpotRuntime)
    background: list[asyncio.Task[None]] = field(default_factory=list)


def services(request: Request) -> Services:
    result: Services = request.app.state.services
    return result


async def open_services(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
) -> Services:
    """Create the engine, the HTTP client and the cipher; migrate a fresh SQLite database."""
    # Every log record this process makes is redacted, the app's own secrets included.
    install_redaction(
        settings.hubspot_client_secret.get_secret_value(),
        settings.admin_token.get_secret_value(),
    )
    cipher = TokenCipher.from_setting(settings.token_encryption_keys.get_secret_value())
    engine = db.create_engine(settings.database_url)
    if settings.is_sqlite:
        await db.migrate_fresh_sqlite(engine, settings.database_url)
    http = httpx.AsyncClient(transport=transport, timeout=HTTP_TIMEOUT, follow_redirects=False)
    sessions = db.session_factory(engine)
    resources = Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        http=http,
        cipher=cipher,
        portals=PortalCache(sessions, cipher),
        inbox_writer=InboxWriter(sessions, cipher),
    )
    try:
        await check_keys_can_read(engine, cipher)
    except BaseException:
        await close_services(resources)
        raise
    return resources


async def close_services(resources: Services) -> None:
    for task in resources.background:
        task.cancel()
    for task in resources.background:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await resources.http.aclose()
    await resources.engine.dispose()


ENCRYPTED_TABLES = ("oauth_tokens", "receptionist_secrets", "events", "oauth_states")


async def check_keys_can_read(engine: AsyncEngine, cipher: TokenCipher) -> None:
    """Refuse to start (or to write) when stored secrets were made by keys not configured."""
    # A command writing with keys that lack the newest one would store what the
    # deployment's keys cannot read, and no process of it could start again.
    try:
        async with engine.connect() as connection:
            if await db.schema_revision(engine) is None:
                return
            used: set[str] = set()
            for table in ENCRYPTED_TABLES:
                rows = await connection.execute(
                    sa.text(f"SELECT DISTINCT key_id FROM {table} WHERE key_id IS NOT NULL")  # noqa: S608
                )
                used.update(row[0] for row in rows)
    except (sa.exc.DBAPIError, OSError, TimeoutError):
        # The database being down is /readyz's business, not a reason to refuse to start.
        return
    missing = sorted(used - set(cipher.key_ids))
    if missing:
        raise UnknownKeyError(
            "TOKEN_ENCRYPTION_KEYS cannot read stored secrets made by key(s) "
            + ", ".join(missing)
            # Whichever way the keys changed (a rotation, or rolling one back), the fix is
            # the same: the key that made them, after the one that is to encrypt.
            + ": add the key(s) that made them to it, after the key that is to encrypt, "
            "then run `hubline keys rotate`"
        )


async def healthz(_request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the database answers and its schema is not behind the code."""
    resources = services(request)
    try:
        revision = await db.answered_within(
            db.DATABASE_PROBE_SECONDS, db.schema_revision(resources.engine)
        )
    except Exception as error:  # any failure to reach the database means not ready
        log.warning("readiness check failed: database unreachable (%s)", type(error).__name__)
        return JSONResponse({"status": "unavailable", "reason": "database unreachable"}, 503)
    if db.schema_is_behind(revision):
        return JSONResponse(
            {"status": "unavailable", "reason": "schema behind the code: run `hubline migrate`"},
            503,
        )
    return JSONResponse({"status": "ok", "schema": revision})


def all_routes() -> list[BaseRoute]:
    from app import admin, console, oauth, settings_page, webhooks
    from app.metrics import metrics_endpoint

    return [
        # First: the router tries routes in order, and webhooks are nearly every request.
        *webhooks.routes,
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *oauth.routes,
        *settings_page.routes,
        *admin.routes,
        *console.routes,
    ]


def create_app(
    settings: Settings,
    *,
    run_worker: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """Hubline's web app; `transport` lets tests send HubSpot calls to the sandbox in-process."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from app.worker import build_worker

        resources = await open_services(settings, transport=transport)
        app.state.services = resources
        worker = build_worker(resources) if run_worker else None
        worker_task = asyncio.create_task(worker.run(), name="worker") if worker else None
        try:
            yield
        finally:
            if worker is not None and worker_task is not None:
                # Finish or release in-flight batches before the engine goes away.
                worker.stop()
                await asyncio.wait([worker_task], timeout=worker.grace_seconds + 5)
            await close_services(resources)

    from app.settings_page import exception_handlers

    return Starlette(
        routes=all_routes(),
        middleware=[Middleware(RequestContextMiddleware)],
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
