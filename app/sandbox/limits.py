"""Rate limits (rolling windows per portal) and injected faults."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass


class RollingWindow:
    """At most `limit` events per `window` seconds for each key, counted over a rolling window."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._hits: dict[object, deque[float]] = {}

    def acquire(self, key: object, limit: int | None, now: float) -> tuple[bool, int]:
        """Count one event if the key is under its limit; answer (allowed, remaining after it)."""
        if limit is None:
            return True, 0
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= limit:
            return False, 0
        hits.append(now)
        return True, limit - len(hits)

    def clear(self) -> None:
        """Forget every counted event."""
        self._hits.clear()


@dataclass
class Fault:
    """The next `count` matching API requests answer `status` (after hanging `hang_seconds`).

    With `probability` below 1, each matching request is hit only with that chance (and
    only hits use up `count`): "30% of requests answer 503" for a fault run.
    """

    count: int
    status: int = 503
    hang_seconds: float = 0.0
    portal_id: int | None = None
    path_prefix: str | None = None
    probability: float = 1.0

    def matches(self, portal_id: int | None, path: str) -> bool:
        """Whether this fault applies to a request."""
        if self.count <= 0:
            return False
        if self.portal_id is not None and self.portal_id != portal_id:
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)

    def to_json(self) -> dict[str, object]:
        """The fault as the inspection API shows it."""
        return {
            "count": self.count,
            "status": self.status,
            "hang_seconds": self.hang_seconds,
            "portal_id": self.portal_id,
            "path_prefix": self.path_prefix,
            "probability": self.probability,
        }


# Its own generator: code that seeds the global one (tests do) must not bias the faults.
_dice = random.Random()


def take_fault(faults: list[Fault], portal_id: int | None, path: str) -> Fault | None:
    """Consume one use of the first fault that applies to a request, if any."""
    for fault in faults:
        if fault.matches(portal_id, path):
            if fault.probability < 1.0 and _dice.random() >= fault.probability:
                continue
            fault.count -= 1
            if fault.count <= 0:
                faults.remove(fault)
            return fault
    return None
