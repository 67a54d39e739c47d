"""The HubSpot client's per-process state: refresh locks, cooldowns, rate budgets, backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.crypto import Secret
from app.hubspot.ratelimit import RateBudget

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter; bounds on how often a call is retried."""

    base_seconds: float = 0.5
    cap_seconds: float = 8.0
    # Attempts in all (the first included) for 5xx, 423 and timeouts on API calls.
    api_attempts: int = 4
    # Attempts in all for 429s, each after the wait HubSpot asked for.
    rate_limit_attempts: int = 6
    # Attempts in all for a refresh grant answering 5xx, 429 or timing out.
    refresh_attempts: int = 3
    # After a refresh failed every attempt, callers fail fast for this long instead of
    # sending a herd of refresh grants to a token endpoint that is already struggling.
    refresh_cooldown_seconds: float = 5.0

    def delay(self, attempt: int, *, minimum: float = 0.0) -> float:
        """The wait after the `attempt`-th failed attempt (1-based), never below `minimum`."""
        ceiling = min(self.cap_seconds, self.base_seconds * float(2 ** (max(attempt, 1) - 1)))
        return max(minimum, random.uniform(0, ceiling))


@dataclass
class AppToken:
    """The app-level (client credentials) token the journal poller uses."""

    access_token: Secret
    expires_at: float  # time.monotonic()


@dataclass
class HubSpotRuntime:
    """What every HubSpot call in this process shares; one per `Services`."""

    backoff: Backoff = field(default_factory=Backoff)
    budget: RateBudget = field(default_factory=RateBudget)
    sleep: Sleep = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    refresh_locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    refresh_cooldown_until: dict[int, float] = field(default_factory=dict)
    forced_refresh_at: dict[int, float] = field(default_factory=dict)  # after a 401, by clock
    app_token: AppToken | None = None
    app_token_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def refresh_lock(self, portal_id: int) -> asyncio.Lock:
        lock = self.refresh_locks.get(portal_id)
        if lock is None:
            lock = self.refresh_locks[portal_id] = asyncio.Lock()
        return lock
