"""Per-portal rate limits with HubSpot's 429 body and headers, latency and injected faults."""

from __future__ import annotations

import time

from app.sandbox import ManualClock
from tests.sandbox.conftest import Sandbox

CONTACTS = "/crm/v3/objects/contacts"
SEARCH = "/crm/v3/objects/contacts/search"


async def test_the_111th_request_in_ten_seconds_is_429(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    headers = await sandbox.token()
    answers = []
    for _ in range(110):
        answers.append(await sandbox.client.get(CONTACTS, headers=headers))
        clock.advance(0.05)

    limited = await sandbox.client.get(CONTACTS, headers=headers)

    assert {a.status_code for a in answers} == {200}
    assert answers[0].headers["X-HubSpot-RateLimit-Max"] == "110"
    assert answers[0].headers["X-HubSpot-RateLimit-Remaining"] == "109"
    assert answers[-1].headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert answers[0].headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert limited.status_code == 429
    body = limited.json()
    assert body["status"] == "error"
    assert body["message"] == "You have reached your ten_secondly_rolling limit."
    assert body["errorType"] == "RATE_LIMIT"
    assert body["policyName"] == "TEN_SECONDLY_ROLLING"
    assert body["correlationId"]
    assert limited.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert "Retry-After" not in limited.headers


async def test_the_window_rolls(sandbox: Sandbox, clock: ManualClock) -> None:
    headers = await sandbox.token()
    for _ in range(110):
        await sandbox.client.get(CONTACTS, headers=headers)
    clock.advance(9.9)
    still_limited = await sandbox.client.get(CONTACTS, headers=headers)
    clock.advance(0.2)

    allowed = await sandbox.client.get(CONTACTS, headers=headers)

    assert still_limited.status_code == 429
    assert allowed.status_code == 200


async def test_limits_are_per_portal(sandbox: Sandbox) -> None:
    acme = await sandbox.token(1001)
    bright = await sandbox.token(1002)
    for _ in range(110):
        await sandbox.client.get(CONTACTS, headers=acme)

    assert (await sandbox.client.get(CONTACTS, headers=acme)).status_code == 429
    assert (await sandbox.client.get(CONTACTS, headers=bright)).status_code == 200


async def test_the_sixth_search_in_a_second_is_429(sandbox: Sandbox, clock: ManualClock) -> None:
    headers = await sandbox.token()
    answers = [await sandbox.client.post(SEARCH, json={}, headers=headers) for _ in range(5)]

    limited = await sandbox.client.post(SEARCH, json={}, headers=headers)
    clock.advance(1.0)
    later = await sandbox.client.post(SEARCH, json={}, headers=headers)

    assert {a.status_code for a in answers} == {200}
    assert "X-HubSpot-RateLimit-Max" not in answers[0].headers, "search answers carry none"
    assert limited.status_code == 429
    assert limited.json()["errorType"] == "RATE_LIMIT"
    assert later.status_code == 200


async def test_searches_do_not_count_against_the_ten_second_limit(
    sandbox: Sandbox, clock: ManualClock
) -> None:
    headers = await sandbox.token()
    for _ in range(30):
        await sandbox.client.post(SEARCH, json={}, headers=headers)
        clock.advance(0.25)
    first = await sandbox.client.get(CONTACTS, headers=headers)

    assert first.headers["X-HubSpot-RateLimit-Remaining"] == "109"


async def test_limits_can_be_switched_off(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    settings = await sandbox.client.post(
        "/_sandbox/settings", json={"requests_per_10s": None, "searches_per_second": None}
    )
    answers = [await sandbox.client.get(CONTACTS, headers=headers) for _ in range(120)]
    searches = [await sandbox.client.post(SEARCH, json={}, headers=headers) for _ in range(8)]

    assert settings.json()["requests_per_10s"] is None
    assert {a.status_code for a in answers + searches} == {200}


async def test_retry_after_can_be_sent(sandbox: Sandbox) -> None:
    sandbox.config.send_retry_after = True
    sandbox.config.requests_per_10s = 1
    headers = await sandbox.token()
    await sandbox.client.get(CONTACTS, headers=headers)

    limited = await sandbox.client.get(CONTACTS, headers=headers)

    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"


async def test_injected_faults_answer_the_next_n_requests(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await sandbox.client.post("/_sandbox/faults", json={"count": 2, "status": 503})

    answers = [await sandbox.client.get(CONTACTS, headers=headers) for _ in range(3)]

    assert [a.status_code for a in answers] == [503, 503, 200]
    assert (await sandbox.client.get("/_sandbox/faults")).json() == {"faults": []}


async def test_a_fault_with_a_probability_hits_only_that_share_of_requests(
    sandbox: Sandbox,
) -> None:
    headers = await sandbox.token()
    sandbox.config.requests_per_10s = None  # only the fault may answer anything but 200
    await sandbox.client.post(
        "/_sandbox/faults", json={"count": 1000, "status": 503, "probability": 0.3}
    )

    answers = [
        (await sandbox.client.get(CONTACTS, headers=headers)).status_code for _ in range(200)
    ]

    assert set(answers) == {200, 503}
    assert 30 <= answers.count(503) <= 90  # 60 expected; far outside this is not 30%
    [fault] = (await sandbox.client.get("/_sandbox/faults")).json()["faults"]
    assert fault["count"] == 1000 - answers.count(503), "only hits use up the count"


async def test_faults_can_target_one_portal(sandbox: Sandbox) -> None:
    acme = await sandbox.token(1001)
    bright = await sandbox.token(1002)
    await sandbox.client.post(
        "/_sandbox/faults", json={"portal_id": 1002, "count": 1, "status": 502}
    )

    assert (await sandbox.client.get(CONTACTS, headers=acme)).status_code == 200
    assert (await sandbox.client.get(CONTACTS, headers=bright)).status_code == 502
    assert (await sandbox.client.get(CONTACTS, headers=bright)).status_code == 200


async def test_faults_can_target_the_token_endpoint(sandbox: Sandbox) -> None:
    tokens = await sandbox.install(1001)
    await sandbox.client.post(
        "/_sandbox/faults", json={"count": 1, "status": 502, "path_prefix": "/oauth/"}
    )
    form = {
        "grant_type": "refresh_token",
        "client_id": sandbox.config.client_id,
        "client_secret": sandbox.config.client_secret,
        "refresh_token": tokens["refresh_token"],
    }

    failed = await sandbox.client.post("/oauth/v3/token", data=form)
    retried = await sandbox.client.post("/oauth/v3/token", data=form)

    assert failed.status_code == 502
    assert retried.status_code == 200
    assert sandbox.state.refresh_count[1001] == 1


async def test_a_hanging_fault_waits_before_answering(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await sandbox.client.post("/_sandbox/faults", json={"count": 1, "hang_seconds": 0.2})

    started = time.perf_counter()
    response = await sandbox.client.get(CONTACTS, headers=headers)

    assert time.perf_counter() - started >= 0.2
    assert response.status_code == 504


async def test_latency_is_added_to_api_requests(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    sandbox.config.latency_seconds = 0.1

    started = time.perf_counter()
    await sandbox.client.get(CONTACTS, headers=headers)

    assert time.perf_counter() - started >= 0.1


async def test_request_counts_by_portal_endpoint_and_status(sandbox: Sandbox) -> None:
    headers = await sandbox.token()
    await sandbox.client.get(CONTACTS, headers=headers)
    await sandbox.client.get(f"{CONTACTS}/404404", headers=headers)

    body = (await sandbox.client.get("/_sandbox/requests", params={"portal_id": 1001})).json()

    counts = {(c["endpoint"], c["status"]): c["count"] for c in body["counts"]}
    assert counts[("GET /crm/v3/objects/contacts", 200)] == 1
    assert counts[("GET /crm/v3/objects/contacts/{object_id}", 404)] == 1
    assert counts[("POST /oauth/v3/token", 200)] == 1
    assert body["by_status"] == {"200": 2, "404": 1}
    assert [r["path"] for r in body["requests"]][-1] == f"{CONTACTS}/404404"


async def test_request_counts_of_every_portal_include_requests_no_portal_made(
    sandbox: Sandbox,
) -> None:
    headers = await sandbox.token()
    await sandbox.client.get(CONTACTS, headers=headers)
    await sandbox.client.get(CONTACTS)  # no token: no portal

    answer = await sandbox.client.get("/_sandbox/requests")

    assert answer.status_code == 200
    portals = [c["portal_id"] for c in answer.json()["counts"]]
    assert None in portals
    assert 1001 in portals
