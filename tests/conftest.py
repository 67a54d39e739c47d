"""Shared fixtures: every database test runs on SQLite and on a real PostgreSQL server.

scripts/test provisions PostgreSQL and sets HUBLINE_TEST_POSTGRES_URL (an admin URL).
Each test gets a fresh database cloned from a migrated template, so tests never
see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db
from app.crypto import TokenCipher, generate_key
from app.settings import Settings, load_settings

POSTGRES_ADMIN_URL = os.environ.get("HUBLINE_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("HUBLINE_REQUIRE_POSTGRES") == "1"

TEST_KEY = generate_key()
TEST_CLIENT_ID = "test-client-id"
TEST_CLIENT_SECRET = "test-client-secret-0123456789"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not POSTGRES_ADMIN_URL and REQUIRE_POSTGRES:
        raise pytest.UsageError("HUBLINE_REQUIRE_POSTGRES=1 but HUBLINE_TEST_POSTGRES_URL is unset")
    # A test marked for one engine is not collected for the other (rather than skipped).
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec else None
        wrong_engine = (backend == "sqlite" and item.get_closest_marker("postgres_only")) or (
            backend == "postgres" and item.get_closest_marker("sqlite_only")
        )
        (dropped if wrong_engine else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _worker_suffix() -> str:
    # Unique per pytest process: concurrent sessions on one server must not share templates.
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"

    async def build() -> None:
        engine = db.create_engine(f"sqlite+aiosqlite:///{path}")
        await db.migrate(engine)
        await engine.dispose()

    asyncio.run(build())
    return path


def _admin_url(database: str) -> str:
    return make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


async def _admin_execute(*statements: str) -> None:
    engine = db.create_engine(
        _admin_url("postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        async with engine.connect() as connection:
            for statement in statements:
                await connection.execute(sa.text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    if not POSTGRES_ADMIN_URL:
        pytest.skip("PostgreSQL tests need HUBLINE_TEST_POSTGRES_URL (scripts/test sets it)")
    name = f"hubline_template_{_worker_suffix()}"

    async def build() -> None:
        await _admin_execute(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
        )
        engine = db.create_engine(_admin_url(name), poolclass=sa.NullPool)
        await db.migrate(engine)
        await engine.dispose()

    asyncio.run(build())
    yield name
    asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for this test: SQLite file or PostgreSQL database."""
    backend = request.param
    if backend == "sqlite":
        if request.node.get_closest_marker("postgres_only"):
            pytest.skip("needs PostgreSQL")
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "hubline.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    if request.node.get_closest_marker("sqlite_only"):
        pytest.skip("SQLite-specific")
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"t_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"'))
    yield _admin_url(name)
    asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all: a SQLite path not created yet, or a new PostgreSQL one."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    if not POSTGRES_ADMIN_URL:
        pytest.skip("PostgreSQL tests need HUBLINE_TEST_POSTGRES_URL (scripts/test sets it)")
    name = f"e_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    yield _admin_url(name)
    asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    """Build Settings for this test's database; keyword arguments override."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "hubspot_client_id": TEST_CLIENT_ID,
            "hubspot_client_secret": TEST_CLIENT_SECRET,
            "token_encryption_keys": TEST_KEY,
            "public_url": "http://hubline.test",
            "hubspot_api_url": "http://sandbox.test",
            "hubspot_auth_url": "http://sandbox.test",
            "journal_poll_seconds": 0,
        }
        values.update(overrides)
        return load_settings({}, **values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def cipher(settings: Settings) -> TokenCipher:
    return TokenCipher.from_setting(settings.token_encryption_keys.get_secret_value())


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> db.SessionFactory:
    return db.session_factory(engine)


# --- the sandbox HubSpot and Hubline, wired together in-process -------------------------

SANDBOX_URL = "http://sandbox.test"
HUBLINE_URL = "http://hubline.test"


@pytest.fixture
def sandbox_config() -> Any:
    from app.sandbox import SandboxConfig

    return SandboxConfig(
        client_id=TEST_CLIENT_ID, client_secret=TEST_CLIENT_SECRET, public_url=SANDBOX_URL
    )


@pytest.fixture
async def sandbox_app(sandbox_config: Any) -> AsyncIterator[Any]:
    from asgi_lifespan import LifespanManager

    from app.sandbox import create_sandbox_app

    app = create_sandbox_app(sandbox_config)
    async with LifespanManager(app):
        yield app


@pytest.fixture
def sandbox(sandbox_app: Any) -> Any:
    """The sandbox's in-memory world (SandboxState), for inspection."""
    return sandbox_app.state.sandbox


@pytest.fixture
async def hubline_app(settings: Settings, sandbox_app: Any) -> AsyncIterator[Any]:
    """Hubline's web app whose HubSpot calls go to the sandbox through httpx.ASGITransport."""
    import httpx
    from asgi_lifespan import LifespanManager

    from app.main import create_app

    app = create_app(settings, transport=httpx.ASGITransport(app=sandbox_app))
    async with LifespanManager(app):
        yield app


@pytest.fixture
async def client(hubline_app: Any) -> AsyncIterator[Any]:
    """An HTTP client talking to Hubline in-process."""
    import httpx

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hubline_app), base_url=HUBLINE_URL
    ) as http:
        yield http


@pytest.fixture
def services(hubline_app: Any) -> Any:
    """Hubline's Services (settings, engine, sessions, http, cipher)."""
    return hubline_app.state.services


# --- installing a portal through the full redirect flow --------------------------------


@dataclass(frozen=True)
class InstalledPortal:
    """A portal installed through /oauth/install → sandbox approve → /oauth/callback."""

    portal_id: int
    webhook_url: str
    webhook_secret: str
    page: str  # the settings page's HTML


def settings_page_value(page: str, testid: str) -> str:
    """The text of the element with this data-testid on a Hubline page."""
    import html
    import re

    match = re.search(rf'data-testid="{re.escape(testid)}"[^>]*>([^<]*)<', page)
    assert match is not None, f"no data-testid={testid!r} on the page"
    return html.unescape(match.group(1)).strip()


async def approve_in_sandbox(sandbox_app: Any, authorize_url: str, portal_id: int) -> str:
    """Open the sandbox's authorize page and press Approve for a portal; the redirect URL."""
    import httpx

    from app.sandbox.testing import approve

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox_app), base_url=SANDBOX_URL
    ) as browser:
        page = await browser.get(authorize_url)
        assert page.status_code == 200, page.text
        return await approve(browser, authorize_url, portal_id)


@pytest.fixture
def install_portal(client: Any, sandbox_app: Any) -> Callable[..., Any]:
    """`await install_portal(portal_id=1001) -> InstalledPortal`, through the real redirects."""

    async def install(portal_id: int = 1001) -> InstalledPortal:
        started = await client.get("/oauth/install")
        assert started.status_code == 302, started.text
        callback_url = await approve_in_sandbox(sandbox_app, started.headers["location"], portal_id)
        page = await client.get(callback_url)
        assert page.status_code == 200, page.text
        return InstalledPortal(
            portal_id=portal_id,
            webhook_url=settings_page_value(page.text, "webhook-url"),
            webhook_secret=settings_page_value(page.text, "webhook-secret"),
            page=page.text,
        )

    return install
