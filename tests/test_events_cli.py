"""`hubline events list|retry` against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import col

from app.crypto import TokenCipher
from app.db import SessionFactory, transaction
from app.inbox import NewEvent, enqueue
from app.models import EventSource, EventStatus, InboxEvent, Portal, utcnow
from tests.conftest import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_KEY

ROOT = Path(__file__).resolve().parent.parent


def hubline(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "HUBSPOT_CLIENT_ID": TEST_CLIENT_ID,
        "HUBSPOT_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
    }
    return subprocess.run(
        [sys.executable, "-m", "app", "events", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def seed(sessions: SessionFactory, cipher: TokenCipher) -> list[int]:
    ids = []
    async with transaction(sessions) as session:
        session.add_all([Portal(portal_id=1001), Portal(portal_id=1002)])
        for portal_id, key, status in [
            (1001, "a", EventStatus.failed),
            (1001, "b", EventStatus.failed),
            (1002, "c", EventStatus.failed),
            (1002, "d", EventStatus.done),
        ]:
            event = NewEvent(
                portal_id,
                EventSource.receptionist,
                "call.completed",
                key,
                utcnow(),
                {"summary": "s"},
            )
            event_id = (await enqueue(event, session=session, cipher=cipher)).event_id
            await session.execute(
                sa.update(InboxEvent)
                .where(col(InboxEvent.id) == event_id)
                .values(
                    status=status,
                    attempts=3,
                    last_error="HubSpot said no" if status == "failed" else None,
                )
            )
            ids.append(event_id)
    return ids


async def statuses(sessions: SessionFactory) -> dict[int, str]:
    async with sessions() as session:
        rows = await session.execute(sa.select(col(InboxEvent.id), col(InboxEvent.status)))
        return dict(rows.all())


async def test_events_list_filters_and_never_shows_payloads(
    database_url: str, sessions: SessionFactory, cipher: TokenCipher
) -> None:
    ids = await seed(sessions, cipher)
    listed = hubline(database_url, "list", "--status", "failed", "--portal", "1001", "--json")
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)
    assert sorted(e["id"] for e in events) == ids[:2]
    assert {e["last_error"] for e in events} == {"HubSpot said no"}
    assert "payload" not in events[0]
    table = hubline(database_url, "list")
    assert "HubSpot said no" in table.stdout
    assert '"summary"' not in table.stdout
    # A HubSpot error's status and category come last in its text: the table cut them
    # off at 60 characters, leaving "HubSpot failed with a ".
    hubspot_said = (
        "POST /crm/v3/objects/contacts/search: HubSpot failed with a server error "
        "status=503 category=INTERNAL_ERROR portal=1001 correlationId=0f1e2d3c"
    )
    async with transaction(sessions) as session:
        await session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id) == ids[0])
            .values(last_error=hubspot_said)
        )
    [row] = [
        line
        for line in hubline(database_url, "list").stdout.splitlines()
        if line.split()[:1] == [str(ids[0])]
    ]
    assert row.rstrip().endswith(" status=503 category=INTERNAL_ERROR")
    assert "POST /crm/v3/objects/contacts/search: HubSpot" in row


async def test_events_retry_one_then_all_failed_of_a_portal(
    database_url: str, sessions: SessionFactory, cipher: TokenCipher
) -> None:
    ids = await seed(sessions, cipher)
    one = hubline(database_url, "retry", str(ids[0]))
    assert one.returncode == 0, one.stderr
    assert (await statuses(sessions))[ids[0]] == EventStatus.pending
    done = hubline(database_url, "retry", str(ids[3]))
    assert done.returncode == 1, "a done event is not retried"
    assert f"event {ids[3]} is done, not failed" in done.stderr
    unknown = hubline(database_url, "retry", "99999")
    assert unknown.returncode == 1
    assert (unknown.stdout, unknown.stderr.strip()) == ("", "there is no event 99999")
    portal = hubline(database_url, "retry", "--failed", "--portal", "1002")
    assert "queued 1 failed events again" in portal.stdout
    assert "queueing failed events again: 1/1" in portal.stderr
    after = await statuses(sessions)
    assert [after[i] for i in ids] == ["pending", "failed", "pending", "done"]
    everything = hubline(database_url, "retry", "--failed")
    assert "queued 1 failed events again" in everything.stdout
    # A portal id that names no portal is a mistake to say, not "0 queued" and success.
    nowhere = hubline(database_url, "retry", "--failed", "--portal", "4242")
    assert (nowhere.returncode, nowhere.stderr.strip()) == (1, "no portal 4242")
    listed = hubline(database_url, "list", "--portal", "4242")
    assert (listed.returncode, listed.stderr.strip()) == (1, "no portal 4242")
    # What cannot mean anything is a usage error, not a flag silently left unread.
    before = await statuses(sessions)
    for args in (("retry",), ("retry", str(ids[1]), "--failed"), ("retry", "--portal", "1002")):
        refused = hubline(database_url, *args)
        assert refused.returncode == 2, args
        assert refused.stderr.startswith("hubline events retry: error: "), args
    assert await statuses(sessions) == before


async def test_ids_and_limits_out_of_range_are_refused_in_one_line(database_url: str) -> None:
    # Past BIGINT (the database could not compare it: a traceback), digits of another
    # script (int() reads them), a limit of -1 (SQLite reads it as no limit at all).
    for args in (
        ("retry", "99999999999999999999"),
        ("retry", "--failed", "--portal", "99999999999999999999"),
        ("list", "--portal", "\u0661\u0660\u0660\u0661"),
        ("list", "--limit", "-1"),
        ("list", "--limit", "0"),
    ):
        refused = hubline(database_url, *args)
        assert refused.returncode == 2, args
        assert "Traceback" not in refused.stderr, args
        assert refused.stderr.strip().splitlines()[-1].startswith("hubline events"), args
