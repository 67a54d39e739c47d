"""GET /admin/api/portals: the operator's list, behind ADMIN_TOKEN."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from tests.conftest import HUBLINE_URL

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings(admin_token=ADMIN_TOKEN)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_admin_api_is_absent_without_an_admin_token(
    make_settings: Any, sandbox_app: Any
) -> None:
    app = create_app(make_settings(), transport=httpx.ASGITransport(app=sandbox_app))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=HUBLINE_URL) as browser,
    ):
        for headers in ({}, bearer(""), bearer(ADMIN_TOKEN)):
            answer = await browser.get("/admin/api/portals", headers=headers)
            assert answer.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong-token"),
        bearer(ADMIN_TOKEN[:-1]),
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
    ],
)
async def test_the_admin_api_needs_the_bearer_token(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    answer = await client.get("/admin/api/portals", headers=headers)
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert answer.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/api/nothing"),
        ("GET", "/admin/api/portals/abc"),
        ("DELETE", "/admin/api/portals"),
    ],
)
async def test_every_admin_api_path_needs_the_token_before_it_is_looked_up(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    refused = await client.request(method, path)
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    answered = await client.request(method, path, headers=bearer(ADMIN_TOKEN))
    if method == "DELETE":
        assert answered.status_code == 405
        assert answered.headers["allow"] == "GET, HEAD"
    else:
        assert answered.status_code == 404
        assert answered.json()["error"] == "not_found"


async def test_the_admin_api_lists_portals_with_their_status(
    client: httpx.AsyncClient, install_portal: Any
) -> None:
    assert (await client.get("/admin/api/portals", headers=bearer(ADMIN_TOKEN))).json() == []
    await install_portal(1002)
    await install_portal(1001)
    answer = await client.get("/admin/api/portals", headers=bearer(ADMIN_TOKEN))
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    portals = answer.json()
    assert [(p["portal_id"], p["status"]) for p in portals] == [(1001, "active"), (1002, "active")]
    assert all(isinstance(p["portal_id"], int) for p in portals)
    first = portals[0]
    assert first["webhook_url"] == f"{HUBLINE_URL}/webhooks/portals/1001/receptionist"
    assert first["reauth_url"] is None
    assert "whsec_" not in answer.text  # never a secret


async def test_the_admin_api_gives_the_re_consent_link(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    from app.db import transaction
    from app.lifecycle import mark_needs_reauth

    await install_portal(1001)
    async with transaction(services.sessions) as session:
        await mark_needs_reauth(
            1001, ["crm.objects.companies.read"], session=session, settings=services.settings
        )
    portal = (await client.get("/admin/api/portals", headers=bearer(ADMIN_TOKEN))).json()[0]
    assert portal["status"] == "needs_reauth"
    assert portal["reauth_url"] == f"{HUBLINE_URL}/oauth/install"
    assert [p["code"] for p in portal["problems"]] == ["needs_reauth"]


async def test_the_console_and_admin_api_say_when_the_database_cannot_be_reached(
    make_settings: Any,
) -> None:
    # They answered 500 "internal error" (the console: "contact Hubline's support", and
    # a traceback in the log) while /readyz and the CLI said what was wrong.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = sock.getsockname()[1]
    url = f"postgresql+asyncpg://hubline:do-not-show-me@127.0.0.1:{nowhere}/hubline"
    app = create_app(make_settings(database_url=url, admin_token=ADMIN_TOKEN))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=HUBLINE_URL
        ) as http,
    ):
        for path in ("/admin/api/portals", "/admin/api/portals/1001"):
            answer = await http.get(path, headers=bearer(ADMIN_TOKEN))
            assert answer.status_code == 503, path
            assert answer.json()["error"] == "database_unavailable"
        page = await http.get("/admin", headers=bearer(ADMIN_TOKEN))
        assert page.status_code == 503
        assert "The database cannot be reached" in page.text
        assert "do-not-show-me" not in page.text
