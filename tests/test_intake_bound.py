"""The intake benchmark's bound (benchmarks/intake_bound.py) does the work it claims.

Its figure is read as what Hubline's intake could reach in this stack, so it must not be
fast by skipping work: what it stores is what Hubline stores and reads back, and it
refuses what Hubline's signature check refuses.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.engine import make_url

from app.crypto import TokenCipher, new_webhook_secret
from app.db import SessionFactory
from app.inbox import NewEvent, idempotency_hashes
from app.models import EventSource, EventStatus, utcnow
from app.receptionist import parse_event
from benchmarks.intake_bound import IntakeBound
from tests.conftest import TEST_KEY
from tests.webhook_support import (
    call_event,
    dumps,
    inbox_rows,
    payloads,
    receptionist_path,
    standard_headers,
)

pytestmark = pytest.mark.sqlite_only

PORTAL = 1003


@pytest.fixture
def secret() -> str:
    return new_webhook_secret()


@pytest.fixture
async def bound(database_url: str, secret: str) -> AsyncIterator[httpx.AsyncClient]:
    path = make_url(database_url).database
    assert path is not None
    app = IntakeBound(database_path=path, secret=secret, encryption_keys=TEST_KEY)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bound.test"
        ) as client,
    ):
        yield client


async def test_stores_what_hubline_stores_and_reads(
    bound: httpx.AsyncClient, secret: str, sessions: SessionFactory, cipher: TokenCipher
) -> None:
    body = dumps(call_event(id="evt_bound_1"))
    headers = standard_headers(secret, body, msg_id="evt_bound_1")

    first = await bound.post(receptionist_path(PORTAL), content=body, headers=headers)
    repeat = await bound.post(receptionist_path(PORTAL), content=body, headers=headers)

    assert first.status_code == 202
    assert repeat.status_code == 200
    assert repeat.json() == {"status": "duplicate"}
    [row] = await inbox_rows(sessions)
    assert first.json() == {"status": "accepted", "event_id": row.id}
    expected = parse_event(
        call_event(id="evt_bound_1"), webhook_id="evt_bound_1", region="US", received_at=utcnow()
    )
    assert await payloads(sessions, cipher) == [expected.payload()]
    new_event = NewEvent(
        portal_id=PORTAL,
        source=EventSource.receptionist,
        type="call.completed",
        idempotency_key="evt_bound_1",
        occurred_at=expected.occurred_at,
    )
    assert row.idempotency_hash == idempotency_hashes(cipher, new_event)[0]
    assert (row.portal_id, row.type, row.status) == (PORTAL, "call.completed", EventStatus.pending)
    assert row.occurred_at == expected.occurred_at


@pytest.mark.parametrize(
    "tamper",
    ["other secret", "stale timestamp", "changed body"],
)
async def test_refuses_what_hubline_refuses(
    bound: httpx.AsyncClient, secret: str, sessions: SessionFactory, tamper: str
) -> None:
    body = dumps(call_event())
    if tamper == "other secret":
        headers = standard_headers(new_webhook_secret(), body)
    elif tamper == "stale timestamp":
        headers = standard_headers(secret, body, timestamp=time.time() - 301)
    else:
        headers = standard_headers(secret, body)
        body = dumps(call_event(lead_score=99))

    with pytest.raises(RuntimeError, match="only signed receptionist events"):
        await bound.post(receptionist_path(PORTAL), content=body, headers=headers)
    assert await inbox_rows(sessions) == []
