"""The per-portal rate budget: a rolling window Hubline keeps under HubSpot's own limits.

HubSpot allows 110 requests per rolling 10 seconds per portal (searches not counted)
and 5 searches per second. Hubline spends at most HUBSPOT_REQUESTS_PER_10S and
HUBSPOT_SEARCHES_PER_SECOND, counts what HubSpot's X-HubSpot-RateLimit-* headers say
was spent (another process may share the portal's budget), and after a 429 sends
nothing for that portal until the wait is over.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

REQUEST_WINDOW_SECONDS = 10.0
SEARCH_WINDOW_SECONDS = 1.0


class RateBudget:
    """Rolling windows per (portal, kind); `acquire` waits for a free slot."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._hits: dict[tuple[int, bool], deque[float]] = {}
        self._not_before: dict[tuple[int, bool], float] = {}

    async def acquire(self, portal_id: int, *, limit: int, search: bool = False) -> None:
        """Wait until one more request fits the portal's window, then count it."""
        key = (portal_id, search)
        window = SEARCH_WINDOW_SECONDS if search else REQUEST_WINDOW_SECONDS
        hits = self._hits.setdefault(key, deque())
        while True:
            now = self._clock()
            while hits and hits[0] <= now - window:
                hits.popleft()
            wait = self._not_before.get(key, 0.0) - now
            if len(hits) >= limit:
                wait = max(wait, hits[0] + window - now)
            if wait <= 0:
                # No await between the check and the count: coroutines cannot overbook.
                hits.append(now)
                return
            await self._sleep(wait)

    def block(self, portal_id: int, seconds: float, *, search: bool = False) -> None:
        """Send nothing of this kind for the portal for `seconds` (HubSpot answered 429)."""
        key = (portal_id, search)
        until = self._clock() + seconds
        self._not_before[key] = max(self._not_before.get(key, 0.0), until)

    def observe(self, portal_id: int, headers: Mapping[str, str]) -> None:
        """Count requests HubSpot says were spent that this process did not send."""
        try:
            maximum = int(headers["X-HubSpot-RateLimit-Max"])
            remaining = int(headers["X-HubSpot-RateLimit-Remaining"])
        except (KeyError, ValueError):
            return
        spent = maximum - remaining
        hits = self._hits.setdefault((portal_id, False), deque())
        missing = min(spent - len(hits), maximum)
        if missing > 0:
            now = self._clock()
            hits.extend([now] * missing)
            # Keep the window ordered: phantom hits are the newest.
            ordered = sorted(hits)
            hits.clear()
            hits.extend(ordered)

    def spent(self, portal_id: int, *, search: bool = False) -> int:
        """Requests counted in the portal's current window (for tests and metrics)."""
        window = SEARCH_WINDOW_SECONDS if search else REQUEST_WINDOW_SECONDS
        now = self._clock()
        return sum(1 for hit in self._hits.get((portal_id, search), ()) if hit > now - window)
