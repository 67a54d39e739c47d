"""/admin/api/portals/{id}: one portal's detail and the console's actions, as JSON."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from sqlmodel import col

from app.db import transaction
from app.main import create_app
from app.models import EventStatus, InboxEvent, Portal, utcnow
from app.sandbox.limits import Fault
from app.settings import Settings
from tests.conftest import HUBLINE_URL
from tests.support_hubline import fast_backoff
from tests.sync_support import call, drain, post_event

ADMIN_TOKEN = "admin-token-for-portal-tests-42"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CALLER = {"name": "Grace Brewster Hopper", "phone": "+1 415 555 0142", "email": "grace@example.com"}


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings(admin_token=ADMIN_TOKEN)


async def events_of(services: Any, portal_id: int, type_: str = "call.completed") -> list[Any]:
    async with services.sessions() as session:
        rows = await session.execute(
            sa.select(InboxEvent)
            .where(col(InboxEvent.portal_id) == portal_id, col(InboxEvent.type) == type_)
            .order_by(col(InboxEvent.id))
            .execution_options(populate_existing=True)
        )
        return list(rows.scalars())


async def test_portal_routes_need_the_token_and_exist_only_with_one(
    client: httpx.AsyncClient, install_portal: Any, make_settings: Any, sandbox_app: Any
) -> None:
    await install_portal(1001)
    for method, path in [
        ("GET", "/admin/api/portals/1001"),
        ("POST", "/admin/api/portals/1001/retry"),
        ("POST", "/admin/api/portals/1001/rotate-secret"),
        ("POST", "/admin/api/portals/1001/disconnect"),
        ("POST", "/admin/api/portals/1001/provision"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = await client.request(method, path, headers=headers)
            assert answer.status_code == 401, path
            assert answer.json()["error"] == "unauthorized"
    assert (await client.get("/admin/api/portals/999", headers=AUTH)).json() == {
        "error": "not_found",
        "detail": "no portal 999",
    }
    assert (await client.post("/admin/api/portals/999/retry", headers=AUTH)).status_code == 404
    assert (await client.post("/admin/api/portals/1001/explode", headers=AUTH)).status_code == 404
    app = create_app(make_settings(), transport=httpx.ASGITransport(app=sandbox_app))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=HUBLINE_URL) as off,
    ):
        answer = await off.get("/admin/api/portals/1001", headers=AUTH)
        assert answer.status_code == 404
        assert (await off.post("/admin/api/portals/1001/retry", headers=AUTH)).status_code == 404


async def test_detail_shows_recent_events_with_their_outcomes_and_no_callers(
    client: httpx.AsyncClient, install_portal: Any, services: Any
) -> None:
    portal = await install_portal(1001)
    await post_event(client, portal, call(id="evt-detail", caller=CALLER, summary="Root canal"))
    await drain(services)
    answer = await client.get("/admin/api/portals/1001", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    detail = answer.json()
    assert (detail["portal_id"], detail["status"]) == (1001, "active")
    assert (detail["pending"], detail["failed_24h"], detail["attention"]) == (0, 0, [])
    assert detail["default_phone_region"] == "US"
    assert detail["last_sync"] is not None
    synced = next(e for e in detail["events"] if e["type"] == "call.completed")
    assert synced["status"] == "done"
    assert synced["engagement"]["object_type"] == "calls"
    assert synced["contact_url"].endswith(f"/contacts/1001/record/0-1/{synced['contact_id']}")
    for private in (portal.webhook_secret, "Grace", "4155550142", "grace@example.com", "Root"):
        assert private not in answer.text


async def test_retry_one_or_all_failed_events_until_they_sync(
    client: httpx.AsyncClient, install_portal: Any, services: Any, sandbox: Any
) -> None:
    portal = await install_portal(1001)
    await drain(services)  # provisioning
    # HubSpot refuses the lookups: each event fails with HubSpot's reason.
    sandbox.faults.append(
        Fault(count=2, status=400, portal_id=1001, path_prefix="/crm/v3/objects/contacts")
    )
    await post_event(client, portal, call(id="evt-a", caller={"phone": "+1 415 555 0101"}))
    await drain(services)
    await post_event(client, portal, call(id="evt-b", caller={"phone": "+1 415 555 0102"}))
    await drain(services)
    first, second = await events_of(services, 1001)
    assert (first.status, second.status) == (EventStatus.failed, EventStatus.failed)
    detail = (await client.get("/admin/api/portals/1001", headers=AUTH)).json()
    assert detail["failed_24h"] == 2
    assert "2 failed in 24 h" in detail["attention"]
    assert all("status=400" in e["error"] for e in detail["events"] if e["status"] == "failed")

    bad = await client.post("/admin/api/portals/1001/retry", headers=AUTH, json={"event_ids": "x"})
    assert bad.status_code == 422
    malformed = await client.post("/admin/api/portals/1001/retry", headers=AUTH, content=b"{")
    assert malformed.status_code == 400
    one = await client.post(
        "/admin/api/portals/1001/retry", headers=AUTH, json={"event_id": first.id}
    )
    assert one.json() == {"retried": 1}
    await drain(services)
    first, second = await events_of(services, 1001)
    assert (first.status, second.status) == (EventStatus.done, EventStatus.failed)
    rest = await client.post("/admin/api/portals/1001/retry", headers=AUTH)
    assert rest.json() == {"retried": 1}
    await drain(services)
    assert {e.status for e in await events_of(services, 1001)} == {EventStatus.done}
    assert len(sandbox.calls(1001)) == 2


async def test_rotate_secret_returns_the_new_one_and_the_old_keeps_working(
    client: httpx.AsyncClient, install_portal: Any
) -> None:
    portal = await install_portal(1001)
    answer = await client.post("/admin/api/portals/1001/rotate-secret", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    rotated = answer.json()
    assert rotated["secret"].startswith("whsec_")
    assert rotated["previous_secret_valid_until"]
    for n, secret in enumerate((portal.webhook_secret, rotated["secret"])):
        accepted = await client.post(
            "/webhooks/portals/1001/receptionist",
            json=call(id=f"evt-rot-{n}"),
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert accepted.status_code == 202


async def test_provision_and_disconnect(
    client: httpx.AsyncClient, install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    await drain(services)
    queued = await client.post("/admin/api/portals/1001/provision", headers=AUTH)
    assert (queued.status_code, queued.json()) == (202, {"queued": True})
    assert len(await events_of(services, 1001, "properties.provision")) == 2
    await drain(services)
    fast_backoff(services)
    down = Fault(count=1000, status=503, path_prefix="/appinstalls/")
    sandbox.faults.append(down)
    refused = await client.post("/admin/api/portals/1001/disconnect", headers=AUTH)
    assert refused.status_code == 503
    assert refused.json()["error"] == "hubspot_unavailable"
    assert "still connected" in refused.json()["detail"]
    assert sandbox.portal(1001).installed
    sandbox.faults.remove(down)
    answer = await client.post("/admin/api/portals/1001/disconnect", headers=AUTH)
    assert answer.status_code == 202
    body = answer.json()
    assert body["uninstalled_on_hubspot"] is True
    assert body["revoked"] is True
    await drain(services)
    async with services.sessions() as session:
        portal = await session.get(Portal, 1001)
    assert portal is not None
    assert portal.status == "uninstalled"
    assert not sandbox.portal(1001).installed
    detail = (await client.get("/admin/api/portals/1001", headers=AUTH)).json()
    assert detail["status"] == "uninstalled"


async def test_failed_in_24_hours_counts_events_that_failed_in_them(
    client: httpx.AsyncClient, install_portal: Any, services: Any, sandbox: Any
) -> None:
    # Counted by receipt, an event received two days ago that failed just now (parked
    # through an uninstall, or retried by an operator) was not counted, nor the portal
    # flagged.
    portal = await install_portal(1001)
    await drain(services)  # provisioning
    sandbox.faults.append(
        Fault(count=1, status=400, portal_id=1001, path_prefix="/crm/v3/objects/contacts")
    )
    await post_event(client, portal, call(caller={"phone": "+1 415 555 0101"}))
    await drain(services)
    async with transaction(services.sessions) as session:
        await session.execute(
            sa.update(InboxEvent).values(received_at=utcnow() - timedelta(days=2))
        )
    detail = (await client.get("/admin/api/portals/1001", headers=AUTH)).json()
    assert detail["failed_24h"] == 1
    assert "1 failed in 24 h" in detail["attention"]
