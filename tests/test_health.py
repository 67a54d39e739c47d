"""/healthz and /readyz."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager

from app import db
from app.main import create_app
from app.settings import Settings
from tests.conftest import POSTGRES_ADMIN_URL, _admin_execute, _admin_url


async def get(settings: Settings, path: str) -> httpx.Response:
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://hubline.test"
        ) as http,
    ):
        return await http.get(path)


async def test_ready_when_the_schema_is_current(settings: Settings) -> None:
    response = await get(settings, "/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "schema": db.head_revision()}
    assert (await get(settings, "/healthz")).status_code == 200


async def test_a_schema_ahead_of_the_code_stays_ready(settings: Settings) -> None:
    engine = db.create_engine(settings.database_url)
    async with engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE alembic_version SET version_num = 'from_the_future'")
        )
    await engine.dispose()
    assert (await get(settings, "/readyz")).status_code == 200


@pytest.mark.postgres_only
async def test_not_ready_while_the_schema_is_behind(make_settings: Callable[..., Settings]) -> None:
    assert POSTGRES_ADMIN_URL
    await _admin_execute(
        'DROP DATABASE IF EXISTS "hubline_unmigrated" WITH (FORCE)',
        'CREATE DATABASE "hubline_unmigrated"',
    )
    try:
        response = await get(
            make_settings(database_url=_admin_url("hubline_unmigrated")), "/readyz"
        )
    finally:
        await _admin_execute('DROP DATABASE IF EXISTS "hubline_unmigrated" WITH (FORCE)')
    assert response.status_code == 503
    assert "hubline migrate" in response.json()["reason"]


@pytest.mark.postgres_only
async def test_not_ready_while_the_database_is_unreachable(
    make_settings: Callable[..., Settings],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(database_url=f"postgresql+asyncpg://nobody@127.0.0.1:{port}/none")
    response = await get(settings, "/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "database unreachable"
    assert (await get(settings, "/healthz")).status_code == 200
