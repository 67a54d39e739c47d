"""Observability: HubSpot metrics, correlation ids on error lines, and central redaction.

The redaction test runs the whole life of a portal at DEBUG level — install, receptionist
events, a refresh, sync (including a record HubSpot rejects), the settings page's actions,
the operator's console and API, disconnect — and scans every log line (as pytest's
handler and as our JSON formatter write them) and every answer Hubline gave for the
secrets and callers' details it saw, raw, URL-encoded and base64-encoded.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.logs import JsonFormatter, redact_text
from app.retry import RetryPolicy
from app.sandbox.limits import Fault
from app.sandbox.properties import options
from app.settings import Settings
from tests.conftest import TEST_CLIENT_SECRET, settings_page_value
from tests.support_hubline import fast_backoff
from tests.sync_support import call, drain, post_event

ADMIN_TOKEN = "admin-token-observability-7f3e9a"


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings(admin_token=ADMIN_TOKEN)


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsDelta:
    """Counter changes between two scrapes of /metrics."""

    def __init__(self, before: str, after: str) -> None:
        self.before, self.after = metric_values(before), metric_values(after)

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The change summed over every series whose labels include these."""
        wanted = set(labels.items())
        return sum(
            value - self.before.get(key, 0.0)
            for key, value in self.after.items()
            if key[0] == name and wanted <= key[1]
        )


async def test_metrics_move_for_hubspot_requests_rate_limits_and_refreshes(
    client: httpx.AsyncClient, install_portal: Any, services: Any, sandbox: Any
) -> None:
    fast_backoff(services)
    portal = await install_portal(1001)
    before = (await client.get("/metrics")).text
    await drain(services)  # provisioning: property reads and creates
    sandbox.faults.append(Fault(count=1, status=429, portal_id=1001))
    sandbox.expire_portal_tokens(1001)  # HubSpot answers 401 until Hubline refreshes
    await post_event(client, portal, call(id="evt-metrics-hubspot"))
    await drain(services)
    delta = MetricsDelta(before, (await client.get("/metrics")).text)

    requests = "hubline_hubspot_requests_total"
    assert delta(requests, endpoint="/crm/v3/properties/contacts", status="200") >= 1
    assert delta.total(requests, status="200") + delta.total(requests, status="201") >= 4
    assert delta.total(requests, status="429") == 1
    assert delta("hubline_hubspot_rate_limited_total") == 1
    assert delta.total(requests, status="401") == 1
    assert delta(requests, endpoint="/oauth/v3/token", status="200") == 1
    assert delta("hubline_token_refreshes_total", outcome="success") == 1
    assert len(sandbox.calls(1001)) == 1
    endpoints = {dict(labels).get("endpoint", "") for name, labels in delta.after}
    folded = [e for e in endpoints if re.search(r"/\d+(/|$)|@|%40|[0-9a-f-]{16}", e)]
    assert not folded, "ids are folded"


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every log record of the test, as our JSON formatter writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


async def test_a_request_id_is_taken_or_made_echoed_and_on_every_line(
    client: httpx.AsyncClient,
    install_portal: Any,
    json_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    portal = await install_portal(1001)

    # The caller's id is kept, echoed, and carried by every line the request logs.
    answer = await client.post(
        f"/webhooks/portals/{portal.portal_id}/receptionist",
        json=call(id="evt-request-id"),
        headers={
            "Authorization": f"Bearer {portal.webhook_secret}",
            "X-Request-ID": "lb-7f3e.9a:01",
        },
    )
    assert answer.status_code == 202, answer.text
    assert answer.headers["X-Request-ID"] == "lb-7f3e.9a:01"
    lines = [line for line in json_lines(json_log) if line.get("request_id") == "lb-7f3e.9a:01"]
    request_line = next(line for line in lines if line["logger"] == "app.requests")
    assert request_line["message"] == f"POST /webhooks/portals/{portal.portal_id}/receptionist 202"

    # Without one, or with one that is too long or carries more than an id needs (it is
    # echoed in a header and written to every log line), Hubline makes its own, per request.
    made: list[str] = []
    for incoming in (None, None, "x" * 129, "a id; with=spaces", '"quoted"', ""):
        headers = {} if incoming is None else {"X-Request-ID": incoming}
        response = await client.get("/healthz", headers=headers)
        made.append(response.headers["X-Request-ID"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in made)
    assert len(set(made)) == len(made)
    logged = {
        line["request_id"] for line in json_lines(json_log) if line["logger"] == "app.requests"
    }
    assert set(made) <= logged


async def test_hubspot_error_lines_carry_the_correlation_id_and_portal(
    client: httpx.AsyncClient,
    install_portal: Any,
    services: Any,
    sandbox: Any,
    json_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    portal = await install_portal(1001)
    await drain(services)
    sandbox.faults.append(
        Fault(count=1, status=400, portal_id=1001, path_prefix="/crm/v3/objects/contacts")
    )
    await post_event(client, portal, call(id="evt-correlated"))
    await drain(services)
    about_errors = [
        line for line in json_lines(json_log) if "correlationId=" in line.get("message", "")
    ]
    assert len(about_errors) >= 2, "the client's line and the worker's line"
    loggers = {line["logger"] for line in about_errors}
    assert {"app.hubspot.client", "app.worker"} <= loggers
    correlation_ids = {line.get("correlation_id") for line in about_errors}
    assert len(correlation_ids) == 1
    [correlation_id] = correlation_ids
    assert re.fullmatch(r"[0-9a-f-]{36}", str(correlation_id))
    assert all(line.get("portal_id") == 1001 for line in about_errors)
    assert all(line.get("hubspot_status") == 400 for line in about_errors)


def encodings(value: str) -> set[str]:
    """A value as it could show up: raw, URL-encoded, base64 (padded or not, URL-safe too)."""
    raw = value.encode()
    forms = {value, quote(value, safe=""), quote_plus(value)}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        forms.update({encoded.decode(), encoded.decode().rstrip("=")})
    return forms


def find_leaks(haystack: str, secrets: dict[str, str]) -> list[str]:
    return [
        f"{label} ({form!r})"
        for label, secret in secrets.items()
        for form in encodings(secret)
        if form in haystack
    ]


CALLERS = [
    {
        "name": "Zebulon Quixote-Farnsworth",
        "phone": "+1 (415) 555-0177",
        "email": "zebulon.qf@example.org",
    },
    {"name": "Philippa Marchbanks", "phone": "415.555.0188", "email": "philippa.m@example.net"},
]
SUMMARY = "Needs the zirconium crown invoice resent before Tuesday"
TRANSCRIPT = "Caller: my locker code is Quasar-Seven, please write it down"


def personal_data() -> dict[str, str]:
    values = {
        "summary": SUMMARY,
        "transcript": TRANSCRIPT,
        "flat summary": "Flat form summary about the platinum bridge",
        "e164 phone": "+14155550177",
        "e164 phone 2": "+14155550188",
    }
    for n, caller in enumerate(CALLERS):
        for field, value in caller.items():
            values[f"caller {n} {field}"] = value
        first, _, last = caller["name"].rpartition(" ")
        values[f"caller {n} first name"], values[f"caller {n} last name"] = first, last
    return values


async def test_no_secret_or_caller_detail_reaches_a_log_line_or_an_answer(
    client: httpx.AsyncClient,
    install_portal: Any,
    services: Any,
    sandbox: Any,
    json_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for noisy in ("httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=noisy)
    fast_backoff(services)
    answers: list[tuple[str, httpx.Response]] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        answers.append((response.request.url.path, response))

    client.event_hooks["response"].append(keep)

    # Install, and the receptionist's events (one refused at the edge, one HubSpot refuses).
    portal = await install_portal(1001)
    await drain(services)
    booked = sandbox.portal(1001).properties["contacts"]["appointment_booked"]
    booked.type, booked.field_type, booked.options = "enumeration", "select", options("yes", "no")
    await post_event(
        client,
        portal,
        call(id="evt-private-1", caller=CALLERS[0], summary=SUMMARY, transcript=TRANSCRIPT),
    )
    flat = {
        "call_id": "evt-private-2",
        "caller_name": CALLERS[1]["name"],
        "caller_phone": CALLERS[1]["phone"],
        "caller_email": CALLERS[1]["email"],
        "call_summary": "Flat form summary about the platinum bridge",
        "appointment_booked": True,
    }
    await post_event(client, portal, flat)
    invalid = dict(flat, call_id="evt-private-3", caller_phone="not a phone", caller_email="x@")
    refused = await client.post(
        portal.webhook_url.removeprefix("http://hubline.test"),
        json=invalid,
        headers={"Authorization": f"Bearer {portal.webhook_secret}"},
    )
    assert refused.status_code == 422
    sandbox.expire_portal_tokens(1001)  # the sync refreshes the token on the way
    await drain(services)
    assert len(sandbox.contacts(1001)) == 2

    # The customer's settings actions.
    page = await client.get("/settings")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    await client.post("/settings/test-event", data={"csrf": csrf.group(1)})
    rotated = await client.post(
        "/settings/rotate-secret", data={"csrf": csrf.group(1)}, follow_redirects=True
    )
    new_secret = settings_page_value(rotated.text, "webhook-secret")
    await client.post("/settings/phone-region", data={"csrf": csrf.group(1), "region": "GB"})

    # The operator: console, API, a retry, a rotation, the metrics, then disconnect.
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await client.post("/admin/login", data={"token": "a wrong guess"})
    await client.post("/admin/login", data={"token": ADMIN_TOKEN})
    await client.get("/admin")
    await client.get("/admin/portals/1001")
    await client.get("/admin/api/portals", headers=bearer)
    await client.get("/admin/api/portals/1001", headers=bearer)
    await client.post("/admin/api/portals/1001/retry", headers=bearer)
    api_rotation = await client.post("/admin/api/portals/1001/rotate-secret", headers=bearer)
    await client.get("/metrics")
    await drain(services)
    await client.post("/admin/api/portals/1001/disconnect", headers=bearer)
    await drain(services)
    after = await client.post(
        portal.webhook_url.removeprefix("http://hubline.test"),
        json=call(id="evt-private-4", caller=CALLERS[0], summary=SUMMARY),
        headers={"Authorization": f"Bearer {new_secret}"},
    )
    assert after.status_code == 202  # parked for a reinstall

    receptionist_secrets = {
        "receptionist secret": portal.webhook_secret,
        "rotated secret": new_secret,
        "api-rotated secret": api_rotation.json()["secret"],
    }
    secrets = {
        "client secret": TEST_CLIENT_SECRET,
        "admin token": ADMIN_TOKEN,
        **{f"sandbox-issued {n}": s for n, s in enumerate(sandbox.issued_secrets())},
    }
    assert len(sandbox.issued_secrets()) >= 5  # the code, two access tokens, the refresh token
    people = personal_data()

    # Every log line, as pytest's handler and as our JSON formatter wrote it.
    pytest_lines = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    json_text = json_log.getvalue()
    assert "refreshed the access token" in json_text, "the flow ran at debug level"
    assert '"level": "debug", "logger": "app.hubspot.client"' in json_text
    for where, text in (("caplog", pytest_lines), ("JSON log", json_text)):
        leaks = find_leaks(text, {**secrets, **receptionist_secrets, **people})
        assert not leaks, f"{where} leaks: {leaks}"

    # Every answer Hubline gave: its headers and body. The receptionist secret may appear
    # only where it is meant to: the settings pages and the operator's rotation answers.
    assert len(answers) >= 18
    for path, response in answers:
        text = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        checked = {**secrets, **people}
        settings_page = path.startswith(("/oauth/callback", "/settings"))
        if not (settings_page or path.endswith("/rotate-secret")):
            checked.update(receptionist_secrets)
        leaks = find_leaks(text, checked)
        assert not leaks, f"{path} answered with {leaks}"


class EchoingHubSpot(httpx.AsyncBaseTransport):
    """The sandbox, except that contact creates fail with a message repeating the request."""

    def __init__(self, inner: httpx.AsyncBaseTransport, status: int) -> None:
        self.inner = inner
        self.status = status

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/contacts/batch/create"):
            echoed = (await request.aread()).decode()
            body = {"status": "error", "message": f"Unable to process request: {echoed}"}
            return httpx.Response(self.status, json=body | {"category": "INTERNAL_ERROR"})
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize("status", [500, 404, 413, 423])
async def test_a_hubspot_error_echoing_the_request_leaves_no_caller_detail_anywhere(
    client: httpx.AsyncClient,
    install_portal: Any,
    services: Any,
    sandbox_app: Any,
    json_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    # HubSpot's message was the error's text for every status but 400, 409 and 422: one
    # that repeats the request put names and summaries in logs, events.last_error (kept
    # after the payload is purged), the admin API and the console.
    caplog.set_level(logging.DEBUG)
    portal = await install_portal(1001)
    await drain(services)
    services.http._transport = EchoingHubSpot(httpx.ASGITransport(app=sandbox_app), status)
    await post_event(client, portal, call(id="evt-echoed", caller=CALLERS[0], summary=SUMMARY))
    await drain(services, retry_policy=RetryPolicy(max_attempts=1, outage_attempts=1))
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    api = await client.get("/admin/api/portals/1001", headers=bearer)
    [failed] = [e for e in api.json()["events"] if e["status"] == "failed"]
    assert f"status={status}" in failed["error"]
    await client.post("/admin/login", data={"token": ADMIN_TOKEN})
    console = await client.get("/admin/portals/1001")
    people = {
        label: value
        for label, value in personal_data().items()
        if label.startswith("caller 0") or label == "summary"
    }
    logged = caplog.text + json_log.getvalue()
    for where, text in (("logs", logged), ("admin API", api.text), ("console", console.text)):
        leaks = find_leaks(text, people)
        assert not leaks, f"{where} show {leaks}"


def test_redaction_catches_url_encoded_and_configured_secrets() -> None:
    from app.logs import register_secrets

    register_secrets("configured-secret-value-123")
    line = (
        "GET /crm/v3/objects/contacts/ada%40example.com?idProperty=email "
        "phone=%2B1%20415%20555%200100 secret Y29uZmlndXJlZC1zZWNyZXQtdmFsdWUtMTIz "
        "and configured-secret-value-123"
    )
    clean = redact_text(line)
    for leaked in ("ada", "415", "Y29uZmlndXJlZC1zZWNyZXQtdmFsdWUtMTIz", "configured-secret"):
        assert leaked not in clean
    assert "/crm/v3/objects/contacts/" in clean
