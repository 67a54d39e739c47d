"""The receptionist webhook's in-memory portal cache: fast, yet never wrong for long."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlmodel import col

from app.crypto import TokenCipher
from app.db import SessionFactory, transaction
from app.models import EventStatus, Portal, PortalStatus, ReceptionistSecret, utcnow
from app.portals import PortalCache, create_secret
from tests.webhook_support import (
    add_portal,
    call_event,
    dumps,
    inbox_rows,
    receptionist_path,
    standard_headers,
)

PORTAL = 1001


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _deliver(client: httpx.AsyncClient, secret: str, event_id: str) -> int:
    """Post a signed receptionist call event to the portal; answers the status code."""
    body = dumps(call_event(id=event_id))
    answer = await client.post(
        receptionist_path(PORTAL), content=body, headers=standard_headers(secret, body)
    )
    return answer.status_code


async def _set_status(sessions: SessionFactory, status: PortalStatus) -> None:
    async with transaction(sessions) as session:
        await session.execute(
            sa.update(Portal).where(col(Portal.portal_id) == PORTAL).values(status=status)
        )


async def test_a_secret_added_by_another_process_works_at_once_despite_the_cache(
    client: httpx.AsyncClient, services: Any
) -> None:
    old = await add_portal(services.sessions, services.cipher, PORTAL)
    body = dumps(call_event(id="evt-1"))
    path = receptionist_path(PORTAL)
    assert (
        await client.post(path, content=body, headers=standard_headers(old, body))
    ).status_code == 202
    # Written as `hubline portals rotate-secret` in another process would: this process's
    # cache is not told, so the failed check must read the secrets again before refusing.
    async with transaction(services.sessions) as session:
        new = await create_secret(PORTAL, session=session, cipher=services.cipher)
    body = dumps(call_event(id="evt-2"))
    answer = await client.post(path, content=body, headers=standard_headers(new, body))
    assert answer.status_code == 202
    body = dumps(call_event(id="evt-3"))
    wrong = standard_headers("whsec_" + "B" * 43 + "=", body)
    assert (await client.post(path, content=body, headers=wrong)).status_code == 401
    assert len(await inbox_rows(services.sessions)) == 2


async def test_an_uninstall_seen_by_intake_within_the_ttl(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    await add_portal(sessions, cipher, PORTAL)
    clock = Clock()
    cache = PortalCache(sessions, cipher, ttl=5.0, clock=clock)
    portal, remembered = await cache.get(PORTAL)
    assert portal is not None
    assert portal.status == PortalStatus.active
    assert not remembered
    await _set_status(sessions, PortalStatus.uninstalled)
    clock.now += 4.9
    portal, remembered = await cache.get(PORTAL)
    assert portal is not None
    assert remembered
    assert portal.status == PortalStatus.active
    clock.now += 0.2
    portal, remembered = await cache.get(PORTAL)
    assert portal is not None
    assert not remembered
    assert portal.status == PortalStatus.uninstalled


async def test_an_uninstalled_portals_events_are_parked_once_the_cache_lapses(
    client: httpx.AsyncClient, services: Any
) -> None:
    secret = await add_portal(services.sessions, services.cipher, PORTAL)
    assert await _deliver(client, secret, "evt-1") == 202
    await _set_status(services.sessions, PortalStatus.uninstalled)
    services.portals.forget(PORTAL)  # what PORTAL_CACHE_SECONDS passing does
    assert await _deliver(client, secret, "evt-2") == 202
    statuses = sorted(row.status for row in await inbox_rows(services.sessions))
    assert statuses == [EventStatus.parked, EventStatus.pending]


async def test_a_reinstall_made_elsewhere_is_not_parked_on_a_stale_cache(
    client: httpx.AsyncClient, services: Any
) -> None:
    secret = await add_portal(services.sessions, services.cipher, PORTAL)
    await _set_status(services.sessions, PortalStatus.uninstalled)
    assert await _deliver(client, secret, "evt-1") == 202  # cached: uninstalled
    # Reinstalled through another process: it un-parked what it saw, and this process's
    # cache still says uninstalled. An event parked now would wait for the next reinstall.
    await _set_status(services.sessions, PortalStatus.active)
    assert await _deliver(client, secret, "evt-2") == 202
    statuses = sorted(row.status for row in await inbox_rows(services.sessions))
    assert statuses == [EventStatus.parked, EventStatus.pending]


async def test_a_cached_secret_never_outlives_its_grace(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    await add_portal(sessions, cipher, PORTAL)
    async with transaction(sessions) as session:
        await session.execute(
            sa.update(ReceptionistSecret).values(expires_at=utcnow() + timedelta(seconds=2))
        )
        await create_secret(PORTAL, session=session, cipher=cipher)
    clock = Clock()
    cache = PortalCache(sessions, cipher, ttl=60.0, clock=clock)
    portal, _ = await cache.get(PORTAL)
    assert portal is not None
    assert len(portal.secrets) == 2
    clock.now += 3.0
    portal, remembered = await cache.get(PORTAL)
    assert not remembered


async def test_an_unknown_portal_is_not_remembered(
    sessions: SessionFactory, cipher: TokenCipher
) -> None:
    cache = PortalCache(sessions, cipher, ttl=60.0, clock=Clock())
    assert await cache.get(PORTAL) == (None, False)
    await add_portal(sessions, cipher, PORTAL)
    portal, remembered = await cache.get(PORTAL)
    assert portal is not None
    assert not remembered
