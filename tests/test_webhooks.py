"""The receptionist webhook: each bad input gets its answer and stores nothing; good ones once."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.crypto import Secret, new_webhook_secret
from app.db import transaction
from app.inbox import read_payload
from app.logs import JsonFormatter
from app.models import EventStatus, PortalStatus
from app.portals import rotate_secret
from app.receptionist import NOT_AN_HTTPS_ADDRESS
from app.webhooks import STALE_TIMESTAMP
from tests.outage import database_outage
from tests.webhook_support import (
    add_portal,
    call_event,
    dumps,
    inbox_rows,
    receptionist_path,
    standard_headers,
)

PORTAL = 1001
OTHER_PORTAL = 1002
Post = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
async def secret(services: Any) -> Secret:
    return await add_portal(services.sessions, services.cipher, PORTAL)


@pytest.fixture
def post(client: httpx.AsyncClient) -> Post:
    async def send(
        body: bytes,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        portal_id: int | str = PORTAL,
    ) -> httpx.Response:
        return await client.post(receptionist_path(portal_id), content=body, headers=headers or {})

    return send


async def test_a_signed_event_is_stored_once_and_acknowledged(
    post: Post, secret: Secret, services: Any
) -> None:
    body = dumps(call_event())
    response = await post(body, standard_headers(secret, body))
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"
    [row] = await inbox_rows(services.sessions)
    assert (row.portal_id, row.source, row.type, row.status) == (
        PORTAL,
        "receptionist",
        "call.completed",
        EventStatus.pending,
    )
    assert row.occurred_at.isoformat() == "2026-03-02T14:30:00+00:00"
    payload = read_payload(row, services.cipher)
    assert payload["caller"]["phone_e164"] == "+14155550100"
    assert payload["caller"]["email"] == "ada@example.com"


async def test_a_bearer_secret_authenticates_too(post: Post, secret: Secret, services: Any) -> None:
    body = dumps(call_event())
    response = await post(body, {"Authorization": f"Bearer {secret.reveal()}"})
    assert response.status_code == 202
    assert len(await inbox_rows(services.sessions)) == 1


async def test_the_flat_form_is_accepted(post: Post, secret: Secret, services: Any) -> None:
    body = dumps({"call_id": "c-1", "caller_phone": "4155550100", "call_summary": "hi"})
    response = await post(body, standard_headers(secret, body))
    assert response.status_code == 202
    [row] = await inbox_rows(services.sessions)
    assert row.type == "call.completed"


def _bad_requests(
    secret: Secret, other: Secret
) -> list[tuple[str, int, int | str, bytes, dict[str, str]]]:
    good = dumps(call_event())
    no_caller = dumps(call_event(caller={"name": "Ada"}))
    big = b'{"id": "x", "pad": "' + b"a" * (1024 * 1024) + b'"}'
    stale = standard_headers(secret, good, timestamp=time.time() - 600)
    return [
        ("missing authentication", 401, PORTAL, good, {}),
        ("bad signature", 401, PORTAL, good, standard_headers(secret, good + b" ")),
        ("stale signature", 401, PORTAL, good, stale),
        (
            "future signature",
            401,
            PORTAL,
            good,
            standard_headers(secret, good, timestamp=time.time() + 600),
        ),
        ("another portal's secret", 401, PORTAL, good, standard_headers(other, good)),
        (
            "another portal's bearer",
            401,
            PORTAL,
            good,
            {"Authorization": f"Bearer {other.reveal()}"},
        ),
        (
            "garbage signature headers",
            401,
            PORTAL,
            good,
            {"webhook-id": "x", "webhook-timestamp": "yesterday", "webhook-signature": "v1"},
        ),
        (
            "garbage signature list",
            401,
            PORTAL,
            good,
            {**standard_headers(secret, good), "webhook-signature": "v1,=== ,,"},
        ),
        (
            "signed malformed body",
            400,
            PORTAL,
            b'{"id": "x",',
            standard_headers(secret, b'{"id": "x",'),
        ),
        (
            "malformed JSON with a bearer",
            400,
            PORTAL,
            b"not json",
            {"Authorization": f"Bearer {secret.reveal()}"},
        ),
        ("missing phone and email", 422, PORTAL, no_caller, standard_headers(secret, no_caller)),
        (
            "a gzipped body",
            400,
            PORTAL,
            gzip.compress(good),
            {"Authorization": f"Bearer {secret.reveal()}", "Content-Encoding": "gzip"},
        ),
        ("oversized body", 413, PORTAL, big, {}),
        ("oversized body to an unknown portal", 413, 9999, big, {}),
        ("unknown portal", 404, 9999, good, standard_headers(secret, good)),
        ("not a portal id", 404, "abc", good, standard_headers(secret, good)),
        ("a portal id too large", 404, "9" * 40, good, standard_headers(secret, good)),
    ]


async def test_every_bad_input_gets_its_answer_and_stores_nothing(
    post: Post, secret: Secret, services: Any
) -> None:
    other = await add_portal(services.sessions, services.cipher, OTHER_PORTAL)
    for name, status, portal_id, body, headers in _bad_requests(secret, other):
        response = await post(body, headers, portal_id)
        assert response.status_code == status, name
        error = response.json()
        assert set(error) == {"error", "detail"}, name
        assert await inbox_rows(services.sessions) == [], name


async def test_a_call_with_a_recording_link_that_is_no_https_address_is_stored_without_it(
    post: Post, secret: Secret, services: Any
) -> None:
    body = dumps(call_event(recording_url="javascript:alert(1)"))
    response = await post(body, standard_headers(secret, body))
    assert response.status_code == 202
    assert response.json()["ignored"] == [
        {"field": "recording_url", "message": NOT_AN_HTTPS_ADDRESS}
    ]
    [row] = await inbox_rows(services.sessions)
    assert read_payload(row, services.cipher)["recording_url"] is None
    clean = dumps(call_event(id="evt_clean"))
    assert "ignored" not in (await post(clean, standard_headers(secret, clean))).json()


async def test_a_compressed_body_is_told_to_come_uncompressed(
    post: Post, secret: Secret, services: Any
) -> None:
    body = gzip.compress(dumps(call_event()))
    headers = {"Authorization": f"Bearer {secret.reveal()}", "Content-Encoding": "gzip"}
    response = await post(body, headers)
    assert response.status_code == 400
    assert response.json() == {
        "error": "malformed_json",
        "detail": "the body is not JSON: it is gzip-encoded; send it uncompressed",
    }
    assert await inbox_rows(services.sessions) == []


async def test_a_right_signature_with_a_stale_timestamp_is_told_to_check_its_clock(
    post: Post, secret: Secret, services: Any
) -> None:
    other = await add_portal(services.sessions, services.cipher, OTHER_PORTAL)
    body = dumps(call_event())
    for skew in (-600, 600):
        stale = standard_headers(secret, body, timestamp=time.time() + skew)
        response = await post(body, stale)
        assert response.status_code == 401
        assert response.json()["detail"] == STALE_TIMESTAMP
    # Signed by someone else, or not at all, the refusal says nothing of the clock.
    for headers in (standard_headers(other, body, timestamp=time.time() - 600), {}):
        response = await post(body, headers)
        assert response.status_code == 401
        assert response.json()["detail"] != STALE_TIMESTAMP
    # Nor does a fresh signature refused for giving a header twice.
    fresh = standard_headers(secret, body)
    twice = [*fresh.items(), ("webhook-timestamp", fresh["webhook-timestamp"])]
    response = await post(body, twice)
    assert response.status_code == 401
    assert response.json()["detail"] != STALE_TIMESTAMP
    assert await inbox_rows(services.sessions) == []


async def test_a_422_lists_field_problems(post: Post, secret: Secret) -> None:
    body = dumps(call_event(type="call.started", caller={}))
    response = await post(body, standard_headers(secret, body))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {"field": "caller", "message": "needs a phone or an email"} in detail
    assert all(set(item) == {"field", "message"} for item in detail)


async def test_an_over_long_phone_is_a_422_that_neither_the_answer_nor_the_log_repeats(
    post: Post, secret: Secret, services: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    phone = "Zebulon Quixotic, 12 Elm Street, Springfield; call after six " * 2
    body = dumps(call_event(caller={"phone": phone}))
    response = await post(body, standard_headers(secret, body))
    assert response.status_code == 422
    assert [item["field"] for item in response.json()["detail"]] == ["caller.phone"]
    assert "Zebulon" not in response.text
    assert "Zebulon" not in caplog.text
    assert await inbox_rows(services.sessions) == []


@pytest.mark.parametrize("path", [receptionist_path(PORTAL), "/webhooks/hubspot"])
async def test_a_client_that_goes_away_mid_body_is_a_quiet_400_that_stores_nothing(
    hubline_app: Any, secret: Secret, services: Any, path: str
) -> None:
    """It was a 500 with ClientDisconnect's traceback in the error log."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"hubline.test"), (b"content-length", b"5000")],
        "client": ("127.0.0.1", 50000),
        "server": ("hubline.test", 80),
    }
    arriving = [
        {"type": "http.request", "body": b'{"id": "evt', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return arriving.pop(0) if arriving else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await hubline_app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert await inbox_rows(services.sessions) == []


async def test_a_receptionist_webhooks_log_lines_carry_its_portal_id(
    post: Post, secret: Secret, services: Any, database_url: str
) -> None:
    """The README's promise: every log line carries the portal id where there is one."""
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("app")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        body = dumps(call_event())
        assert (await post(body, standard_headers(secret, body))).status_code == 202
        other = dumps(call_event(id="evt-2"))
        async with database_outage(services.engine, database_url):
            assert (await post(other, standard_headers(secret, other))).status_code == 503
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in written.getvalue().splitlines()]
    requests = [line for line in lines if line["logger"] == "app.requests"]
    unstored = [line for line in lines if "not stored" in line["message"]]
    assert len(requests) == 2
    assert len(unstored) == 1
    assert {line.get("portal_id") for line in requests + unstored} == {PORTAL}


async def test_a_chunked_oversized_body_is_refused_while_reading(
    client: httpx.AsyncClient, secret: Secret, services: Any
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 65536

    response = await client.post(
        receptionist_path(PORTAL),
        content=chunks(),
        headers={"Authorization": f"Bearer {secret.reveal()}"},
    )
    assert response.status_code == 413
    assert await inbox_rows(services.sessions) == []


async def test_a_body_of_exactly_one_mebibyte_is_read(post: Post, secret: Secret) -> None:
    prefix = b'{"id": "x", "type": "test.ping", "pad": "'
    body = prefix + b"a" * (1024 * 1024 - len(prefix) - 2) + b'"}'
    assert len(body) == 1024 * 1024
    response = await post(body, {"Authorization": f"Bearer {secret.reveal()}"})
    assert response.status_code == 202


async def test_the_same_event_five_times_in_a_row_is_stored_once(
    post: Post, secret: Secret, services: Any
) -> None:
    body = dumps(call_event())
    answers = [(await post(body, standard_headers(secret, body))).status_code for _ in range(5)]
    assert answers == [202, 200, 200, 200, 200]
    assert len(await inbox_rows(services.sessions)) == 1


async def test_the_same_event_twenty_times_at_once_is_stored_once(
    post: Post, secret: Secret, services: Any
) -> None:
    body = dumps(call_event())
    responses = await asyncio.gather(
        *(post(body, standard_headers(secret, body, msg_id=f"m{i}")) for i in range(20))
    )
    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    assert len({r.json()["event_id"] for r in responses}) == 1
    assert len(await inbox_rows(services.sessions)) == 1


async def test_the_webhook_id_identifies_an_event_without_id(
    post: Post, secret: Secret, services: Any
) -> None:
    event = call_event()
    del event["id"]
    body = dumps(event)
    for _ in range(3):
        assert (await post(body, standard_headers(secret, body, msg_id="msg_42"))).is_success
    assert len(await inbox_rows(services.sessions)) == 1
    response = await post(body, {"Authorization": f"Bearer {secret.reveal()}"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "id"


@pytest.mark.parametrize(
    "repeated", ["webhook-id", "webhook-timestamp", "webhook-signature", "authorization"]
)
async def test_a_delivery_giving_an_authenticating_header_twice_is_refused(
    client: httpx.AsyncClient, secret: Secret, services: Any, repeated: str
) -> None:
    # A captured delivery without a body id, replayed with a webhook-id of the sender's
    # choosing in front: the signature was checked against one copy and the event keyed
    # by the other, so each replay was stored (and synced) as a new call.
    event = call_event()
    del event["id"]
    body = dumps(event)
    signed = standard_headers(secret, body, msg_id="msg_captured")
    assert (await client.post(receptionist_path(PORTAL), content=body, headers=signed)).is_success
    headers = [(repeated, "msg_chosen"), *signed.items()]
    if repeated == "authorization":
        # Two bearer tokens are as ambiguous: which one a check reads is an accident.
        headers = [
            ("authorization", "Bearer not-it"),
            ("authorization", f"Bearer {secret.reveal()}"),
        ]
    replayed = await client.post(receptionist_path(PORTAL), content=body, headers=headers)
    assert replayed.status_code == 401
    assert len(await inbox_rows(services.sessions)) == 1


@pytest.mark.parametrize("status", [PortalStatus.uninstalled, PortalStatus.needs_reauth])
async def test_events_for_a_portal_that_cannot_sync_are_parked(
    post: Post, services: Any, status: PortalStatus
) -> None:
    secret = await add_portal(services.sessions, services.cipher, 1003, status=status)
    body = dumps(call_event())
    response = await post(body, standard_headers(secret, body), 1003)
    assert response.status_code == 202
    [row] = await inbox_rows(services.sessions)
    assert row.status == EventStatus.parked


async def test_a_rotated_secret_works_until_its_grace_ends(
    post: Post, secret: Secret, services: Any
) -> None:
    async with transaction(services.sessions) as session:
        graced = await rotate_secret(
            PORTAL, session=session, cipher=services.cipher, grace=timedelta(hours=1)
        )
    for index, signer in enumerate([secret, graced]):
        body = dumps(call_event(id=f"evt_{index}"))
        assert (await post(body, standard_headers(signer, body))).status_code == 202
    async with transaction(services.sessions) as session:
        newest = await rotate_secret(
            PORTAL, session=session, cipher=services.cipher, grace=timedelta(0)
        )
    body = dumps(call_event(id="evt_late"))
    assert (await post(body, standard_headers(graced, body))).status_code == 401
    assert (await post(body, standard_headers(newest, body))).status_code == 202
    unknown = Secret(new_webhook_secret())
    assert (await post(body, standard_headers(unknown, body))).status_code == 401


async def test_a_portal_region_reads_national_numbers(post: Post, services: Any) -> None:
    secret = await add_portal(services.sessions, services.cipher, 1004, region="GB")
    body = dumps(call_event(caller={"phone": "020 7946 0018"}))
    assert (await post(body, standard_headers(secret, body), 1004)).status_code == 202
    [row] = await inbox_rows(services.sessions)
    assert read_payload(row, services.cipher)["caller"]["phone_e164"] == "+442079460018"
