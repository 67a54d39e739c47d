"""Fast versions of the reliability suite's runs (reliability/, issue 10), on every change.

The crash runs drive real processes over real HTTP, as `reliability/run` does, with a
few hundred events and workers whose lease is 3 s (so a killed worker's portals are
taken over within seconds); the replay and ciphertext-swap checks run in-process.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.crypto import TokenCipher
from app.models import InboxEvent
from reliability.crash import CrashConfig, crash_run
from reliability.isolation import stored_slots, swap_decrypts
from reliability.report import RunResult, write_json
from reliability.stack import Postgres
from tests.conftest import POSTGRES_ADMIN_URL, TEST_CLIENT_SECRET
from tests.webhook_support import (
    add_portal,
    call_event,
    dumps,
    hubspot_event,
    hubspot_headers,
    receptionist_path,
    standard_headers,
)

SHORT_LEASE_CRASHES = CrashConfig(
    events=300,
    portals=4,
    workers=2,
    kills=4,
    fault_rate=0.05,
    worker_kind="short-lease",
    worker_lease_seconds=3.0,
    kill_every=(1.0, 3.0),
    drain_timeout=120.0,
    seed=7,
)


@pytest.mark.postgres_only
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_workers_killed_at_random_lose_and_duplicate_nothing(
    database_url: str, tmp_path: Path
) -> None:
    result = RunResult(1, "worker crashes", "test")
    accounting = await crash_run(
        Postgres(POSTGRES_ADMIN_URL),
        tmp_path,
        SHORT_LEASE_CRASHES,
        result,
        database_url=database_url,
    )
    assert result.details["kills"] == SHORT_LEASE_CRASHES.kills
    assert set(result.details["delivery_statuses"]) <= {200, 202}
    assert accounting.lost == 0, accounting.lost_examples
    assert accounting.synced + accounting.failed_visible == SHORT_LEASE_CRASHES.events
    assert accounting.duplicate_contacts == 0
    assert accounting.duplicate_engagements == 0
    assert accounting.unfinished == 0


@pytest.mark.postgres_only
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_harness_reports_loss_from_a_worker_that_marks_events_done_first(
    database_url: str, tmp_path: Path
) -> None:
    # Every HubSpot answer fails, so each batch the planted bug marks done is lost. With
    # half failing (as before) a run now and then lost nothing: four attempts per request
    # get through often enough, and the kills' timing is luck.
    broken = CrashConfig(
        events=100,
        portals=2,
        workers=1,
        kills=2,
        fault_rate=1.0,
        worker_kind="broken",
        worker_lease_seconds=3.0,
        kill_every=(0.5, 1.5),
        drain_timeout=90.0,
        seed=8,
    )
    result = RunResult(2, "broken worker", "test")
    accounting = await crash_run(
        Postgres(POSTGRES_ADMIN_URL), tmp_path, broken, result, database_url=database_url
    )
    assert accounting.lost > 0


async def _stored_events(services: Any) -> list[InboxEvent]:
    async with services.sessions() as session:
        return list((await session.execute(sa.select(InboxEvent))).scalars())


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_thousand_replays_of_a_signed_delivery_store_one_event(
    client: Any, services: Any
) -> None:
    secret = await add_portal(services.sessions, services.cipher, 1001)
    body = dumps(call_event(id="evt_replayed"))
    headers = standard_headers(secret, body, msg_id="msg_replayed")
    gate = asyncio.Semaphore(20)

    async def replay() -> int:
        async with gate:
            answer = await client.post(receptionist_path(1001), content=body, headers=headers)
            return int(answer.status_code)

    answers = Counter(await asyncio.gather(*(replay() for _ in range(1000))))
    assert answers == {202: 1, 200: 999}
    assert len(await _stored_events(services)) == 1


@pytest.mark.parametrize("offset", [-301, 301])
async def test_a_replay_one_second_outside_the_window_is_refused(
    client: Any, services: Any, offset: int
) -> None:
    secret = await add_portal(services.sessions, services.cipher, 1001)
    body = dumps(call_event(id="evt_late"))
    # The header carries whole seconds (cut down, up to a second earlier) and time passes
    # before the server checks it: both move a timestamp toward the past, out of the
    # window on the past side and back into it on the future side. Give each its margin.
    margin = 1.5 if offset > 0 else 0.0
    outside = standard_headers(secret, body, timestamp=time.time() + offset + margin)
    assert (
        await client.post(receptionist_path(1001), content=body, headers=outside)
    ).status_code == 401
    assert await _stored_events(services) == []
    margin = 1.0 if offset < 0 else 0.0
    inside = standard_headers(secret, body, timestamp=time.time() + offset * 299 / 301 + margin)
    assert (
        await client.post(receptionist_path(1001), content=body, headers=inside)
    ).status_code == 202


async def test_a_hubspot_batch_replayed_is_stored_once_and_refused_past_the_window(
    client: Any, services: Any
) -> None:
    await add_portal(services.sessions, services.cipher, 1001)
    body = dumps([hubspot_event(portalId=1001)])
    url = "http://hubline.test/webhooks/hubspot"
    headers = hubspot_headers(TEST_CLIENT_SECRET, url, body)
    answers = Counter(
        [
            (await client.post("/webhooks/hubspot", content=body, headers=headers)).status_code
            for _ in range(50)
        ]
    )
    assert answers == {200: 50}
    assert len(await _stored_events(services)) == 1
    stale = hubspot_headers(
        TEST_CLIENT_SECRET, url, body, timestamp_ms=int((time.time() - 301) * 1000)
    )
    assert (await client.post("/webhooks/hubspot", content=body, headers=stale)).status_code == 401


async def test_ciphertexts_swapped_across_portals_and_fields_never_decrypt(
    install_portal: Any, client: Any, services: Any, database_url: str
) -> None:
    portals = [await install_portal(portal_id) for portal_id in (1001, 1002, 1003)]
    for portal in portals:
        for n in range(3):
            body = dumps(call_event(id=f"evt_{portal.portal_id}_{n}"))
            answer = await client.post(
                receptionist_path(portal.portal_id),
                content=body,
                headers={"authorization": f"Bearer {portal.webhook_secret}"},
            )
            assert answer.status_code == 202
    slots = await stored_slots(database_url)
    assert {slot.label.split("/")[0] for slot in slots} >= {
        "access",
        "refresh",
        "secret",
        "payload",
    }
    cipher: TokenCipher = services.cipher
    tried, decrypted = swap_decrypts(cipher, slots, 1000, random.Random(10))
    assert (tried, decrypted) == (1000, 0)


def test_a_partial_reliability_run_keeps_the_other_runs_in_the_report(tmp_path: Path) -> None:
    report = tmp_path / "latest.json"
    everything = [RunResult(n, f"run {n}", "-", passed=True) for n in (1, 2, 9)]
    write_json(everything, report, keep_other_runs=True, command="reliability/run")
    again = RunResult(2, "run 2", "-", passed=False)
    write_json([again], report, keep_other_runs=True, command="reliability/run --runs 2")
    document = json.loads(report.read_text())
    # It held run 2 alone: the full suite's report was gone after one partial run.
    assert [(r["number"], r["passed"], r["command"]) for r in document["runs"]] == [
        (1, True, "reliability/run"),
        (2, False, "reliability/run --runs 2"),
        (9, True, "reliability/run"),
    ]
    assert document["passed"] is False
    write_json([again], report, keep_other_runs=False)
    assert [r["number"] for r in json.loads(report.read_text())["runs"]] == [2]
