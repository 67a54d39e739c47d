"""Retry policy: a pure function of the error and the attempt count; the worker only records it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from app.db import UNREACHABLE
from app.errors import (
    ClientRefused,
    CryptoError,
    HubSpotAuthError,
    HubSpotConflict,
    HubSpotError,
    HubSpotRateLimited,
    HubSpotUnavailable,
    HubSpotValidationError,
    PermanentError,
    PortalUnavailable,
    RefreshRejected,
    UnrecordedWrite,
)


class Action(StrEnum):
    """What becomes of an event whose attempt failed."""

    retry = "retry"  # try again after `delay`
    fail = "fail"  # give up: the event ends failed with the error
    park = "park"  # the portal cannot be served now: park its events; the attempt does not count


@dataclass(frozen=True)
class Decision:
    """The retry policy's answer for one failed attempt: an action, and for a retry its delay."""

    action: Action
    delay: float = 0.0


# HubSpot's search shows new records within a few seconds.
AMBIGUOUS_WRITE_MIN_DELAY = 15.0
# Failures that say nothing of the event: HubSpot down, slow or limiting, the database
# unreachable (not a statement of the handler's refused: that may be a bug), and HubSpot
# refusing the deployment's own client credentials (until an operator mends them).
# They end when the outage does, so they are retried far longer.
OUTAGES: tuple[type[BaseException], ...] = (
    HubSpotUnavailable,
    HubSpotRateLimited,
    ClientRefused,
    *UNREACHABLE,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped, for at most `max_attempts` attempts
    (`outage_attempts` when the failure is an outage's)."""

    base_seconds: float = 2.0
    cap_seconds: float = 600.0
    max_attempts: int = 10
    # About a day at the cap's average wait: ten attempts are over in 8 to 17 minutes,
    # and a HubSpot incident that outlasted them failed every event of every portal,
    # each then waiting for an operator's retry.
    outage_attempts: int = 300
    ambiguous_write_min_delay: float = AMBIGUOUS_WRITE_MIN_DELAY

    def ceiling(self, attempt: int) -> float:
        """The largest delay after the `attempt`-th failed attempt (1-based)."""
        return min(self.cap_seconds, self.base_seconds * float(2 ** (max(attempt, 1) - 1)))

    def decide(
        self, error: BaseException, attempt: int, *, rng: random.Random | None = None
    ) -> Decision:
        """What to do after the `attempt`-th attempt (1-based) failed with `error`."""
        if isinstance(error, PortalUnavailable | RefreshRejected):
            return Decision(Action.park)
        if isinstance(
            error, PermanentError | HubSpotValidationError | HubSpotConflict | CryptoError
        ):
            return Decision(Action.fail)
        if isinstance(error, HubSpotAuthError) and error.status_code == 403:
            return Decision(Action.fail)  # a missing scope does not grant itself on retry
        if attempt >= (self.outage_attempts if isinstance(error, OUTAGES) else self.max_attempts):
            return Decision(Action.fail)
        delay = (rng or random).uniform(0, self.ceiling(attempt))
        if isinstance(error, HubSpotError | UnrecordedWrite) and error.ambiguous:
            # The retry looks for what the lost write may have created; give HubSpot's
            # search index time to show it.
            delay = max(delay, self.ambiguous_write_min_delay)
        if isinstance(error, HubSpotRateLimited) and error.retry_after:
            # Never come back before HubSpot said the window reopens.
            delay = max(delay, error.retry_after)
        return Decision(Action.retry, delay)


DEFAULT_POLICY = RetryPolicy()
