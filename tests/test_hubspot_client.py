"""The HubSpot client against the sandbox: refresh middleware, retries, rate budget, errors."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col

from app.crypto import Secret
from app.db import transaction
from app.errors import (
    HubSpotAuthError,
    HubSpotConflict,
    HubSpotError,
    HubSpotRateLimited,
    HubSpotUnavailable,
    HubSpotValidationError,
)
from app.hubspot import HubSpotClient, TokenResponse, hubspot_client
from app.hubspot.auth import FORCED_REFRESH_INTERVAL
from app.hubspot.client import RATE_LIMITED_MINIMUM_WAIT, error_from_response
from app.hubspot.oauth2 import MAX_RETRY_AFTER
from app.hubspot.ratelimit import RateBudget
from app.inbox import NewEvent, enqueue
from app.main import close_services, open_services
from app.models import EventSource, OAuthToken, utcnow
from app.retry import Action, RetryPolicy
from app.sandbox.limits import Fault
from app.sync import property_errors
from app.tokens import load_tokens
from tests.support_hubline import fast_backoff

CONTACTS = "/crm/v3/objects/contacts"


class FakeTime:
    """A clock and a sleep that moves it, so waits are measured without being waited."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
async def portal(install_portal: Any, services: Any) -> int:
    await install_portal(1001)
    fast_backoff(services)
    return 1001


def crm_requests(sandbox: Any, portal_id: int) -> int:
    return sum(
        1 for r in sandbox.request_log if r.portal_id == portal_id and r.path.startswith("/crm/")
    )


def token_requests(sandbox: Any) -> int:
    return sum(1 for r in sandbox.request_log if r.path == "/oauth/v3/token")


async def expire_stored_tokens(services: Any, portal_id: int) -> None:
    """Hubline's copy says the token expired (as it would after 30 minutes)."""
    async with services.sessions() as session, session.begin():
        await session.execute(
            sa.update(OAuthToken)
            .where(col(OAuthToken.portal_id) == portal_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


async def stored_tokens(services: Any, portal_id: int) -> Any:
    async with services.sessions() as session:
        return await load_tokens(portal_id, session=session, cipher=services.cipher)


async def test_a_call_carries_the_portals_token(portal: int, services: Any, sandbox: Any) -> None:
    answer = await hubspot_client(services, portal).get_json(CONTACTS)
    assert answer == {"results": []}
    assert crm_requests(sandbox, portal) == 1
    assert sum(sandbox.refresh_count.values()) == 0


async def test_fifty_concurrent_calls_with_an_expired_token_refresh_once(
    portal: int, services: Any, sandbox: Any
) -> None:
    sandbox.expire_portal_tokens(portal)
    await expire_stored_tokens(services, portal)
    before = await stored_tokens(services, portal)

    client = hubspot_client(services, portal)
    answers = await asyncio.gather(*(client.get_json(CONTACTS) for _ in range(50)))

    assert all(answer == {"results": []} for answer in answers)
    assert sandbox.refresh_count[portal] == 1
    assert crm_requests(sandbox, portal) == 50  # refreshed before sending: no 401s
    after = await stored_tokens(services, portal)
    assert after.version == before.version + 1
    assert after.access_token != before.access_token
    assert after.expires_at > utcnow() + timedelta(minutes=25)


async def test_fifty_concurrent_calls_answered_401_refresh_once(
    portal: int, services: Any, sandbox: Any
) -> None:
    # Only HubSpot knows: every call is answered 401 and forces the one refresh.
    sandbox.expire_portal_tokens(portal)
    client = hubspot_client(services, portal)
    answers = await asyncio.gather(*(client.get_json(CONTACTS) for _ in range(50)))
    assert all(answer == {"results": []} for answer in answers)
    assert sandbox.refresh_count[portal] == 1
    # At most one 401 and one retry each (calls that read the token after the refresh
    # went out with the fresh one at once).
    assert 50 < crm_requests(sandbox, portal) <= 100


async def test_a_token_answered_401_forever_makes_two_calls_and_one_refresh(
    portal: int, services: Any, sandbox: Any
) -> None:
    sandbox.faults.append(Fault(count=1000, status=401, path_prefix="/crm/"))
    with pytest.raises(HubSpotAuthError) as raised:
        await hubspot_client(services, portal).get_json(CONTACTS)
    assert raised.value.status_code == 401
    assert raised.value.portal_id == portal
    assert crm_requests(sandbox, portal) == 2
    assert sandbox.refresh_count[portal] == 1


async def test_a_401_that_fresh_tokens_meet_too_forces_a_refresh_once_a_minute(
    portal: int, services: Any, sandbox: Any
) -> None:
    """HubSpot: a 401 alone does not mean the token needs renewing. Calls that keep
    meeting 401s do not each send a refresh to the token endpoint."""
    now = [1000.0]
    services.hubspot.clock = lambda: now[0]
    sandbox.faults.append(Fault(count=1000, status=401, path_prefix="/crm/"))
    client = hubspot_client(services, portal)
    for _ in range(3):
        with pytest.raises(HubSpotAuthError) as raised:
            await client.get_json(CONTACTS)
        assert raised.value.status_code == 401
    assert sandbox.refresh_count[portal] == 1
    assert crm_requests(sandbox, portal) == 2 + 1 + 1  # a retry after the one refresh
    now[0] += FORCED_REFRESH_INTERVAL + 1
    with pytest.raises(HubSpotAuthError):
        await client.get_json(CONTACTS)
    assert sandbox.refresh_count[portal] == 2


async def test_every_refresh_stores_the_refresh_token_it_returns(
    portal: int, services: Any, sandbox: Any
) -> None:
    sandbox.config.rotate_refresh_tokens = True
    for expected_refreshes in (1, 2, 3):
        await expire_stored_tokens(services, portal)
        await hubspot_client(services, portal).get_json(CONTACTS)
        assert sandbox.refresh_count[portal] == expected_refreshes
        stored = await stored_tokens(services, portal)
        live = [
            t for t, r in sandbox.refresh_tokens.items() if r.portal_id == portal and not r.revoked
        ]
        assert live == [stored.refresh_token.reveal()]


async def test_a_failing_token_endpoint_is_retried_then_cools_down(
    portal: int, services: Any, sandbox: Any
) -> None:
    # A manual clock: however slow the machine, the herd below runs inside the cooldown.
    now = [1000.0]
    services.hubspot.clock = lambda: now[0]
    await expire_stored_tokens(services, portal)
    before = await stored_tokens(services, portal)
    attempts = services.hubspot.backoff.refresh_attempts
    baseline = token_requests(sandbox)  # the install's code exchange
    sandbox.faults.append(Fault(count=attempts, status=503, path_prefix="/oauth/v3/token"))
    client = hubspot_client(services, portal)

    with pytest.raises(HubSpotUnavailable):
        await client.get_json(CONTACTS)
    assert token_requests(sandbox) - baseline == attempts
    assert await stored_tokens(services, portal) == before  # untouched

    # During the cooldown a herd of callers fails fast without a refresh grant.
    results = await asyncio.gather(
        *(client.get_json(CONTACTS) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, HubSpotUnavailable) for r in results)
    assert token_requests(sandbox) - baseline == attempts

    now[0] += services.hubspot.backoff.refresh_cooldown_seconds + 0.05
    assert await client.get_json(CONTACTS) == {"results": []}
    assert sandbox.refresh_count[portal] == 1


async def call_during_a_hanging_refresh(
    services: Any, portal: int, sandbox: Any, seconds: float
) -> asyncio.Task[Any]:
    """A call whose token expired, started and left refreshing: the token endpoint's first
    answer hangs `seconds` (then 503s), and it has begun hanging when this returns."""
    await expire_stored_tokens(services, portal)
    sandbox.faults.append(
        Fault(count=1, status=503, hang_seconds=seconds, path_prefix="/oauth/v3/token")
    )
    call = asyncio.create_task(hubspot_client(services, portal).get_json(CONTACTS))
    while sandbox.faults:  # taken by the refresh's first request
        await asyncio.sleep(0.01)
    return call


async def test_a_slow_token_endpoint_holds_up_no_other_database_write(
    portal: int, services: Any, sandbox: Any
) -> None:
    """On SQLite a transaction held across the refresh would hold the whole database:
    intake, lease renewals and every worker would wait for HubSpot's token endpoint."""
    refreshing = await call_during_a_hanging_refresh(services, portal, sandbox, 3.0)

    async def receive_an_event() -> None:
        async with transaction(services.sessions) as session:
            await enqueue(
                NewEvent(
                    portal_id=portal,
                    source=EventSource.receptionist,
                    type="call.completed",
                    idempotency_key="during-the-refresh",
                    occurred_at=utcnow(),
                ),
                session=session,
                cipher=services.cipher,
            )

    storing = asyncio.create_task(receive_an_event())
    done, _ = await asyncio.wait({refreshing, storing}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {storing}, "the event waited for HubSpot's token endpoint"
    await storing
    assert await refreshing == {"results": []}
    assert sandbox.refresh_count[portal] == 1


async def test_a_refresh_that_another_process_beat_uses_the_stored_tokens(
    portal: int,
    services: Any,
    sandbox: Any,
    sandbox_app: Any,
    settings: Any,
    database_url: str,
) -> None:
    """Two processes refresh at once: the tokens stored first stay, and the slower refresh
    uses them rather than overwrite them. PostgreSQL's row lock holds the second process
    back until the first has stored its tokens, which it then uses without a refresh;
    SQLite holds no lock while HubSpot answers, so the second refreshes too."""
    slow = await call_during_a_hanging_refresh(services, portal, sandbox, 1.0)
    other = await open_services(settings, transport=httpx.ASGITransport(app=sandbox_app))
    try:
        assert await hubspot_client(other, portal).get_json(CONTACTS) == {"results": []}
    finally:
        await close_services(other)
    stored_first = await stored_tokens(services, portal)
    assert await slow == {"results": []}
    assert sandbox.refresh_count[portal] == (2 if database_url.startswith("sqlite") else 1)
    kept = await stored_tokens(services, portal)
    assert (kept.access_token, kept.version) == (stored_first.access_token, stored_first.version)


async def test_a_transient_refresh_failure_is_retried(
    portal: int, services: Any, sandbox: Any
) -> None:
    await expire_stored_tokens(services, portal)
    baseline = token_requests(sandbox)
    sandbox.faults.append(Fault(count=1, status=502, path_prefix="/oauth/v3/token"))
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}
    assert token_requests(sandbox) - baseline == 2
    assert sandbox.refresh_count[portal] == 1


async def test_429_waits_before_sending_again(portal: int, services: Any, sandbox: Any) -> None:
    fake = FakeTime()
    services.hubspot.budget = RateBudget(clock=fake.clock, sleep=fake.sleep)
    sandbox.faults.append(Fault(count=2, status=429, path_prefix="/crm/"))
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}
    assert crm_requests(sandbox, portal) == 3
    # Each 429 blocked the portal at least a second before the next request went out.
    assert len(fake.sleeps) == 2
    assert all(wait >= 1.0 for wait in fake.sleeps)


async def test_429_with_retry_after_waits_that_long_then_gives_up(
    portal: int, services: Any, sandbox: Any
) -> None:
    fake = FakeTime()
    services.hubspot.budget = RateBudget(clock=fake.clock, sleep=fake.sleep)
    sandbox.config.requests_per_10s = 1
    sandbox.config.send_retry_after = True
    client = hubspot_client(services, portal)
    await client.get_json(CONTACTS)  # spends the sandbox's whole (real-time) window
    with pytest.raises(HubSpotRateLimited) as raised:
        await client.get_json(CONTACTS)
    attempts = services.hubspot.backoff.rate_limit_attempts
    assert crm_requests(sandbox, portal) == 1 + attempts
    assert fake.sleeps
    assert all(wait >= 1.0 for wait in fake.sleeps)
    assert raised.value.retry_after == 1.0
    assert raised.value.category == "RATE_LIMIT"
    assert raised.value.correlation_id


async def test_5xx_is_retried_up_to_a_bound_then_raised_with_context(
    portal: int, services: Any, sandbox: Any
) -> None:
    sandbox.faults.append(Fault(count=100, status=502, path_prefix="/crm/"))
    with pytest.raises(HubSpotUnavailable) as raised:
        await hubspot_client(services, portal).get_json(CONTACTS)
    assert crm_requests(sandbox, portal) == services.hubspot.backoff.api_attempts
    error = raised.value
    assert (error.portal_id, error.status_code) == (portal, 502)
    assert error.correlation_id
    assert f"portal={portal}" in str(error)
    assert "correlationId=" in str(error)


async def test_a_few_5xx_then_success(portal: int, services: Any, sandbox: Any) -> None:
    sandbox.faults.append(Fault(count=2, status=503, path_prefix="/crm/"))
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}
    assert crm_requests(sandbox, portal) == 3


class FlakyTransport(httpx.AsyncBaseTransport):
    """The sandbox, except that the first `failures` CRM calls time out."""

    def __init__(self, inner: httpx.AsyncBaseTransport, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/crm/") and self.failures > 0:
            self.failures -= 1
            raise httpx.ReadTimeout("timed out", request=request)
        return await self.inner.handle_async_request(request)


async def test_timeouts_are_retried_up_to_a_bound(
    portal: int, services: Any, sandbox_app: Any
) -> None:
    flaky = FlakyTransport(httpx.ASGITransport(app=sandbox_app), failures=2)
    services.http._transport = flaky  # the one transport seam every call goes through
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}
    flaky.failures = 100
    with pytest.raises(HubSpotUnavailable) as raised:
        await hubspot_client(services, portal).get_json(CONTACTS)
    assert "ReadTimeout" in str(raised.value)
    assert raised.value.portal_id == portal


async def test_hubspot_errors_become_the_error_tree(portal: int, services: Any) -> None:
    client = hubspot_client(services, portal)
    with pytest.raises(HubSpotError) as missing:
        await client.get_json(f"{CONTACTS}/999999999")
    assert missing.value.status_code == 404
    assert missing.value.category == "OBJECT_NOT_FOUND"
    assert missing.value.correlation_id

    body = {"properties": {"email": "ada@example.com", "firstname": "Ada"}}
    created = await client.post_json(CONTACTS, body)
    with pytest.raises(HubSpotConflict) as conflict:
        await client.post_json(CONTACTS, body)
    assert conflict.value.existing_id == created["id"]
    assert "ada@example.com" not in str(conflict.value)

    with pytest.raises(HubSpotValidationError) as invalid:
        await client.post_json(CONTACTS, {"properties": {"no_such_property": "x"}})
    assert invalid.value.status_code == 400
    assert invalid.value.category == "VALIDATION_ERROR"


async def test_search_calls_spend_the_search_budget(portal: int, services: Any) -> None:
    client = hubspot_client(services, portal)
    await client.post_json(f"{CONTACTS}/search", {"filterGroups": [], "limit": 1}, search=True)
    budget = services.hubspot.budget
    assert budget.spent(portal, search=True) == 1
    assert budget.spent(portal) == 0


async def test_the_budget_follows_hubspots_rate_limit_headers(
    portal: int, services: Any, sandbox: Any
) -> None:
    # Another process spent part of the portal's window: HubSpot's headers say so.
    for _ in range(30):
        sandbox.request_window.acquire(portal, 110, sandbox.now())
    await hubspot_client(services, portal).get_json(CONTACTS)
    assert services.hubspot.budget.spent(portal) == 31


# --- the budget and secrecy, without HubSpot ---------------------------------------------


async def test_the_budget_never_exceeds_its_window() -> None:
    fake = FakeTime()
    budget = RateBudget(clock=fake.clock, sleep=fake.sleep)
    for _ in range(5):
        await budget.acquire(7, limit=5)
    assert fake.sleeps == []
    await budget.acquire(7, limit=5)
    assert fake.sleeps == [10.0]
    await budget.acquire(8, limit=5)  # another portal has its own window
    assert fake.sleeps == [10.0]


async def test_a_blocked_portal_sends_nothing_until_the_wait_is_over() -> None:
    fake = FakeTime()
    budget = RateBudget(clock=fake.clock, sleep=fake.sleep)
    budget.block(7, 2.5)
    await budget.acquire(7, limit=100)
    assert fake.sleeps == [2.5]
    await budget.acquire(7, limit=100, search=True)  # searches have their own budget
    assert fake.sleeps == [2.5]


def test_tokens_never_appear_in_reprs() -> None:
    answer = TokenResponse(
        access_token=Secret("CN-access-secret"),
        refresh_token=Secret("na1-refresh-secret"),
        expires_in=1800,
        hub_id=1001,
        scopes=("oauth",),
    )
    assert "secret" not in repr(answer).replace("Secret(", "")
    assert "CN-access" not in repr(answer)
    assert "na1-refresh" not in repr(answer)


async def test_the_client_repr_names_only_the_portal(portal: int, services: Any) -> None:
    client = HubSpotClient(services, portal)
    assert repr(client) == f"HubSpotClient(portal_id={portal})"


async def test_a_create_that_may_have_happened_is_not_sent_again(
    portal: int, services: Any, sandbox: Any
) -> None:
    sandbox.faults.append(Fault(count=1, status=503, path_prefix="/crm/v3/objects/calls"))
    body = {"inputs": [{"properties": {"hs_timestamp": "2026-03-02T14:30:00Z"}}]}
    with pytest.raises(HubSpotUnavailable) as raised:
        await hubspot_client(services, portal).post_json("/crm/v3/objects/calls/batch/create", body)
    assert raised.value.ambiguous
    assert crm_requests(sandbox, portal) == 1, "a second create could duplicate the call"


async def test_a_create_that_timed_out_is_not_sent_again(
    portal: int, services: Any, sandbox_app: Any
) -> None:
    flaky = FlakyTransport(httpx.ASGITransport(app=sandbox_app), failures=1)
    services.http._transport = flaky
    body = {"inputs": [{"properties": {"hs_timestamp": "2026-03-02T14:30:00Z"}}]}
    with pytest.raises(HubSpotUnavailable) as raised:
        await hubspot_client(services, portal).post_json("/crm/v3/objects/calls/batch/create", body)
    assert raised.value.ambiguous
    assert flaky.failures == 0


async def test_repeatable_posts_are_retried_after_5xx(
    portal: int, services: Any, sandbox: Any
) -> None:
    sandbox.faults.append(Fault(count=2, status=503, path_prefix="/crm/v3/objects/contacts"))
    search = {"filterGroups": [], "limit": 1}
    found = await hubspot_client(services, portal).post_json(
        "/crm/v3/objects/contacts/search", search, search=True
    )
    assert found["results"] == []
    assert crm_requests(sandbox, portal) == 3


def test_a_conflicts_existing_id_survives_redaction() -> None:
    response = httpx.Response(
        409,
        json={
            "category": "CONFLICT",
            "message": "Contact already exists. Existing ID: 123456789012",
        },
        request=httpx.Request("POST", "http://hubspot.test/crm/v3/objects/contacts"),
    )
    error = error_from_response(response, portal_id=1)
    assert isinstance(error, HubSpotConflict)
    assert error.existing_id == "123456789012"


def test_a_refusal_repeating_what_was_sent_is_told_without_it() -> None:
    """HubSpot's 400 repeats the values it refused, which no pattern can find (a name in an
    option label, a summary): the error's text, which is logged and stored as an event's
    last error, holds none of it; the properties it names are still read."""
    refused = [
        {
            "isValid": False,
            "name": "call_outcome",
            "error": "INVALID_OPTION",
            "message": "Call back Ada Lovelace was not one of the allowed options",
        },
        {
            "isValid": False,
            "name": "email",
            "error": "INVALID_EMAIL",
            "message": "Email address josé@exämple.com is invalid",
        },
    ]
    response = httpx.Response(
        400,
        json={
            "status": "error",
            "category": "VALIDATION_ERROR",
            "correlationId": "c0ffee00-0000-4000-8000-000000000000",
            "message": f"Property values were not valid: {json.dumps(refused)}",
        },
        request=httpx.Request("POST", "http://hubspot.test/crm/v3/objects/contacts/batch/create"),
    )
    error = error_from_response(response, portal_id=1, what="POST /crm/v3/objects/contacts")
    told = str(error)
    assert "Ada" not in told
    assert "exämple" not in told
    assert "status=400" in told
    assert "category=VALIDATION_ERROR" in told
    assert "c0ffee00-0000-4000-8000-000000000000" in told
    assert [(p.name, p.code) for p in property_errors(error)] == [
        ("call_outcome", "INVALID_OPTION"),
        ("email", "INVALID_EMAIL"),
    ]
    assert "exämple" not in error.detail, "an email is masked even in the detail"


class RateLimitedOnce(httpx.AsyncBaseTransport):
    """The sandbox, except that the first CRM call answers 429 with this Retry-After."""

    def __init__(self, inner: httpx.AsyncBaseTransport, retry_after: str) -> None:
        self.inner = inner
        self.retry_after = retry_after
        self.limited = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/crm/") and not self.limited:
            self.limited = True
            body = {"status": "error", "category": "RATE_LIMIT", "correlationId": "c-429"}
            return httpx.Response(429, headers={"Retry-After": self.retry_after}, json=body)
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize(
    ("asked", "waited"),
    [
        ("2", 2.0),
        # Not a number of seconds to wait: the backoff decides, as when none is given (its
        # least wait after a 429). "inf" blocked the portal in this process for good.
        ("-3", RATE_LIMITED_MINIMUM_WAIT),
        ("inf", RATE_LIMITED_MINIMUM_WAIT),
        ("nan", RATE_LIMITED_MINIMUM_WAIT),
        ("Wed, 21 Oct 2026 07:28:00 GMT", RATE_LIMITED_MINIMUM_WAIT),
    ],
)
async def test_a_retry_after_out_of_reason_is_not_taken_at_its_word(
    portal: int, services: Any, sandbox_app: Any, asked: str, waited: float
) -> None:
    fake = FakeTime()
    services.hubspot.budget = RateBudget(clock=fake.clock, sleep=fake.sleep)
    services.http._transport = RateLimitedOnce(httpx.ASGITransport(app=sandbox_app), asked)
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}
    # The fixture's backoff is fast: what it adds to the least wait is a few milliseconds.
    assert sum(fake.sleeps) == pytest.approx(waited, abs=0.01)


async def test_a_429_asking_a_long_wait_ends_the_call_and_the_retry_waits_for_it(
    portal: int, services: Any, sandbox_app: Any
) -> None:
    # A worker would otherwise hold the batch asleep for the hour; the event waits in the
    # inbox instead, and nothing goes to HubSpot for the portal meanwhile.
    fake = FakeTime()
    services.hubspot.budget = RateBudget(clock=fake.clock, sleep=fake.sleep)
    services.http._transport = RateLimitedOnce(httpx.ASGITransport(app=sandbox_app), "1e12")
    with pytest.raises(HubSpotRateLimited) as raised:
        await hubspot_client(services, portal).get_json(CONTACTS)
    assert raised.value.retry_after == MAX_RETRY_AFTER
    assert fake.sleeps == []
    decision = RetryPolicy().decide(raised.value, attempt=1)
    assert decision.action is Action.retry
    assert decision.delay == MAX_RETRY_AFTER
    # The schedule can hold it (a year-long delay overflowed the run_after date).
    assert utcnow() + timedelta(seconds=decision.delay) > utcnow()
    await hubspot_client(services, portal).get_json(CONTACTS)
    assert fake.sleeps == [pytest.approx(MAX_RETRY_AFTER)]


class AnswersGarbled(httpx.AsyncBaseTransport):
    """The sandbox carries the request out, but the first answer to `path` is unreadable."""

    def __init__(self, inner: httpx.AsyncBaseTransport, path: str, garbled: httpx.Response):
        self.inner = inner
        self.path = path
        self.garbled: httpx.Response | None = garbled

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answer = await self.inner.handle_async_request(request)
        if request.url.path == self.path and self.garbled is not None:
            await answer.aread()
            answer, self.garbled = self.garbled, None
        return answer


GARBLED = {
    # A corrupt gzip body: httpx raises DecodingError, which is no TransportError.
    "corrupt gzip": lambda: httpx.Response(
        201, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"\x1f\x8bnot gzip")
    ),
    "not JSON": lambda: httpx.Response(201, content=b"<html>Bad gateway</html>"),
}


@pytest.mark.parametrize("garbled", GARBLED)
async def test_an_unreadable_answer_to_a_create_leaves_it_open_whether_it_was_made(
    portal: int, services: Any, sandbox: Any, sandbox_app: Any, garbled: str
) -> None:
    # Read as a plain failure (or a crash), the retry came soon, before HubSpot's search
    # showed the contact made, and made it again; as ambiguous, it waits and looks first.
    create = f"{CONTACTS}/batch/create"
    inner = httpx.ASGITransport(app=sandbox_app)
    services.http._transport = AnswersGarbled(inner, create, GARBLED[garbled]())
    body = {"inputs": [{"properties": {"phone": "+14155550199"}}]}
    with pytest.raises(HubSpotUnavailable) as raised:
        await hubspot_client(services, portal).post_json(create, body)
    assert raised.value.ambiguous
    assert len(sandbox.contacts(portal)) == 1  # made once, never sent again from here
    decision = RetryPolicy().decide(raised.value, attempt=1)
    assert decision.delay >= RetryPolicy().ambiguous_write_min_delay


@pytest.mark.parametrize("garbled", GARBLED)
async def test_an_unreadable_answer_to_a_read_is_hubspots_failure_not_a_bug(
    portal: int, services: Any, sandbox_app: Any, garbled: str
) -> None:
    # A corrupt body is asked for again at once; a body that is no JSON fails the call as
    # HubSpot being unavailable (the worker retries the batch), not as a handler's bug
    # (a ValueError, whose batch is run again in halves at once).
    inner = httpx.ASGITransport(app=sandbox_app)
    services.http._transport = AnswersGarbled(inner, CONTACTS, GARBLED[garbled]())
    if garbled == "not JSON":
        with pytest.raises(HubSpotUnavailable):
            await hubspot_client(services, portal).get_json(CONTACTS)
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}


async def test_a_forced_refresh_that_got_no_token_may_be_forced_again(
    portal: int, services: Any, sandbox: Any
) -> None:
    # HubSpot expired the token early (a 401), and its token endpoint was down for the
    # refresh that forced. Once it is back, the next 401 refreshes: a forced refresh that
    # got no token used to count as one made "moments ago" for a minute, and every call
    # of the portal failed until then.
    sandbox.expire_portal_tokens(portal)
    sandbox.faults.append(Fault(count=1_000, status=503, path_prefix="/oauth/v3/token"))
    with pytest.raises(HubSpotUnavailable):
        await hubspot_client(services, portal).get_json(CONTACTS)
    sandbox.faults.clear()
    await asyncio.sleep(services.hubspot.backoff.refresh_cooldown_seconds)
    assert await hubspot_client(services, portal).get_json(CONTACTS) == {"results": []}
    assert sandbox.refresh_count[portal] == 1
