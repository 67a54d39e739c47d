"""The retry policy is a pure function: tested without a database or a clock."""

from __future__ import annotations

import random

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from app.errors import (
    ClientRefused,
    HubSpotRateLimited,
    HubSpotUnavailable,
    HubSpotValidationError,
    PermanentError,
    PortalUnavailable,
    RefreshRejected,
    UnrecordedWrite,
)
from app.retry import Action, RetryPolicy

POLICY = RetryPolicy(base_seconds=2.0, cap_seconds=300.0, max_attempts=8)


@given(attempt=st.integers(min_value=1, max_value=7), seed=st.integers())
def test_delay_is_full_jitter_within_the_exponential_ceiling(attempt: int, seed: int) -> None:
    decision = POLICY.decide(HubSpotUnavailable("503"), attempt, rng=random.Random(seed))
    assert decision.action is Action.retry
    assert 0 <= decision.delay <= min(300.0, 2.0 * 2 ** (attempt - 1))


def test_ceiling_doubles_then_caps() -> None:
    assert [POLICY.ceiling(n) for n in range(1, 10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_jitter_spreads_delays() -> None:
    delays = {POLICY.decide(RuntimeError(), 5, rng=random.Random(seed)).delay for seed in range(50)}
    assert len(delays) == 50
    assert min(delays) < 8 < max(delays)


def test_last_attempt_fails() -> None:
    assert POLICY.decide(RuntimeError("boom"), 8).action is Action.fail
    assert POLICY.decide(RuntimeError("boom"), 7).action is Action.retry


@pytest.mark.parametrize(
    "error",
    [PermanentError("bad data"), HubSpotValidationError("VALIDATION_ERROR", status_code=400)],
)
def test_permanent_errors_fail_at_once(error: Exception) -> None:
    assert POLICY.decide(error, 1).action is Action.fail


@pytest.mark.parametrize(
    "error",
    [PortalUnavailable(1001, "needs re-authorization"), RefreshRejected("invalid_grant")],
)
def test_portal_errors_park_without_an_attempt_limit(error: Exception) -> None:
    assert POLICY.decide(error, 1).action is Action.park
    assert POLICY.decide(error, 99).action is Action.park


def test_rate_limit_waits_at_least_as_long_as_hubspot_asked() -> None:
    error = HubSpotRateLimited("429", status_code=429, retry_after=9.0)
    for seed in range(20):
        assert POLICY.decide(error, 1, rng=random.Random(seed)).delay >= 9.0


@pytest.mark.parametrize(
    "error",
    [
        HubSpotUnavailable("503 on batch create", status_code=503, ambiguous=True),
        UnrecordedWrite("2 new contacts were created but could not be indexed"),
    ],
)
def test_an_ambiguous_write_waits_for_hubspots_search_to_catch_up(error: Exception) -> None:
    for seed in range(20):
        decision = POLICY.decide(error, 1, rng=random.Random(seed))
        assert decision.action is Action.retry
        assert decision.delay >= POLICY.ambiguous_write_min_delay


@pytest.mark.parametrize(
    "outage",
    [
        HubSpotUnavailable("502", status_code=502),
        HubSpotRateLimited("429", status_code=429),
        sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError()),
        # The deployment's own client credentials refused: until an operator mends them.
        ClientRefused("invalid_client", status_code=400),
    ],
)
def test_an_outage_is_retried_for_a_day_not_ten_attempts(outage: Exception) -> None:
    # Ten attempts are over in 8 to 17 minutes: a HubSpot incident that outlasted them
    # failed every event of every portal, each then waiting for an operator's retry.
    policy = RetryPolicy()
    assert policy.decide(RuntimeError("a bug"), policy.max_attempts).action is Action.fail
    assert policy.decide(outage, policy.max_attempts).action is Action.retry
    assert policy.decide(outage, policy.outage_attempts).action is Action.fail
    # At the cap's average wait, the attempts last about a day.
    hours = policy.outage_attempts * policy.cap_seconds / 2 / 3600
    assert 20 < hours < 30
