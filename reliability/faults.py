"""Run 4: HubSpot misbehaves: 30% 503s, 5% requests hanging past the client timeout, 429 bursts.

Every event must still sync within its attempt budget, the requests spent per event stay
bounded, and after a 429 no request for that portal starts before the Retry-After wait
is over (checked on the sandbox's own request timestamps).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from app.main import HTTP_TIMEOUT
from app.retry import DEFAULT_POLICY
from reliability.crash import wait_drained
from reliability.report import RunResult, say
from reliability.stack import Postgres, Stack, running_stack
from reliability.traffic import DeliveryLog, deliver_all, plan_events
from reliability.verify import account, inbox_rows

PORTALS = [4001, 4002, 4003, 4004, 4005]
HANG_SECONDS = (HTTP_TIMEOUT.read or 20.0) + 5.0
# A request that reached the sandbox this soon after a 429 left the client before the
# 429 did (the client cannot have seen it yet).
IN_FLIGHT_SLACK = 0.05
# The sync spends a handful of requests on a batch of up to 100 events; even with every
# retry HubSpot's faults cause, ten requests per event means something loops.
MAX_REQUESTS_PER_EVENT = 10.0


async def burst_429s(stack: Stack, stop: asyncio.Event, bursts: list[float]) -> None:
    """Bursts of 429s: for 4 s, cut the portals' request limit.

    The first burst comes at once, at 1 request per 10 s, over the first batches' sync:
    the sync spends so few requests that a burst 20 s in sometimes met none, and the run
    then proved nothing about 429s. Then every 20 s, at 3 per 10 s.
    """
    wait, limit = 0.0, 1
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)
        if stop.is_set():
            return
        await stack.sandbox_post("/_sandbox/settings", {"requests_per_10s": limit})
        bursts.append(time.time())
        await asyncio.sleep(4.0)
        await stack.sandbox_post("/_sandbox/settings", {"requests_per_10s": 110})
        wait, limit = 20.0, 3


def early_requests(records: list[dict[str, Any]]) -> tuple[int, int, list[str]]:
    """(429s seen, requests started before a 429's Retry-After was over, examples)."""
    by_kind: dict[tuple[int, bool], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["portal_id"] is not None:
            by_kind[(record["portal_id"], bool(record["search"]))].append(record)
    limited = 0
    early: list[str] = []
    for (portal_id, search), items in by_kind.items():
        starts = sorted(r["at"] - r["duration_ms"] / 1000 for r in items)
        for record in items:
            if record["status"] != 429:
                continue
            limited += 1
            answered = record["at"]
            until = answered + float(record.get("retry_after") or 1.0)
            for start in starts:
                if answered + IN_FLIGHT_SLACK < start < until - 0.01:
                    early.append(
                        f"portal {portal_id}{' search' if search else ''}: a request "
                        f"{start - answered:.3f}s after a 429"
                    )
    return limited, len(early), early[:5]


async def run_hubspot_faults(
    postgres: Postgres, log_dir: Path, *, seed: int = 1, events: int = 150
) -> RunResult:
    result = RunResult(
        4,
        "HubSpot faults",
        f"30% 503, 5% hang {HANG_SECONDS:.0f}s (> client timeout), 429 bursts with Retry-After",
    )
    rng = random.Random(seed)
    planned = plan_events(PORTALS, events, rng=rng, prefix="faults")
    log = DeliveryLog()
    async with running_stack(postgres, log_dir, PORTALS) as stack:
        for _ in range(2):
            stack.start_worker("hubline")
        await stack.install_all()
        await wait_drained(stack.database_url, timeout=120, source=None)
        # Each fault rolls its own dice in order: 30% 503, then 5% of all requests hang.
        await stack.sandbox_post(
            "/_sandbox/faults", {"count": 10**9, "status": 503, "probability": 0.30}
        )
        await stack.sandbox_post(
            "/_sandbox/faults",
            {
                "count": 10**9,
                "status": 504,
                "hang_seconds": HANG_SECONDS,
                "probability": 0.05 / 0.70,
            },
        )
        stop = asyncio.Event()
        bursts: list[float] = []
        burster = asyncio.create_task(burst_429s(stack, stop, bursts))
        started = time.monotonic()
        secrets = {p: i.secret for p, i in stack.installed.items()}
        try:
            await deliver_all(stack.web_url, secrets, planned, log, concurrency=8)
            drained = await wait_drained(stack.database_url, timeout=1200, source="receptionist")
        finally:
            stop.set()
            await burster
            await stack.sandbox_post("/_sandbox/faults", {"count": 0})
            await stack.sandbox_post("/_sandbox/settings", {"requests_per_10s": 110})
        drain_seconds = time.monotonic() - started
        say(f"drained={drained} in {drain_seconds:.0f} s")
        accounting = await account(stack, planned, log.accepted())
        traffic = await stack.sandbox_get("/_sandbox/requests", limit=10**7)
        rows = [r for r in await inbox_rows(stack.database_url) if r.source == "receptionist"]
    records = [r for r in traffic["requests"] if r["portal_id"] in PORTALS]
    limited, early, examples = early_requests(records)
    per_portal_events = events / len(PORTALS)
    per_event = max(
        sum(1 for r in records if r["portal_id"] == p) / per_portal_events for p in PORTALS
    )
    max_attempts = max((row.attempts for row in rows), default=0)
    result.sent = log.sent
    result.lost = accounting.lost
    result.duplicated = accounting.duplicate_contacts + accounting.duplicate_engagements
    result.details = {
        "events": events,
        "drain_seconds": round(drain_seconds, 1),
        "hubspot_answers": traffic["by_status"],
        "429_bursts": len(bursts),
        "429_answers": limited,
        "requests_before_retry_after": early,
        "early_examples": examples,
        "max_requests_per_event": round(per_event, 2),
        "max_attempts_used": max_attempts,
        "synced": accounting.synced,
        "failed": accounting.failed_visible,
        "failure_reasons": accounting.failure_reasons,
        "duplicate_contacts": accounting.duplicate_contacts,
        "duplicate_engagements": accounting.duplicate_engagements,
    }
    result.check("every event synced", accounting.synced == events)
    result.check(
        f"within the attempt budget ({DEFAULT_POLICY.max_attempts})",
        max_attempts <= DEFAULT_POLICY.max_attempts and accounting.failed_visible == 0,
    )
    result.check(
        f"≤ {MAX_REQUESTS_PER_EVENT:.0f} requests per event", per_event <= MAX_REQUESTS_PER_EVENT
    )
    result.check("429s were injected", limited > 0)
    result.check("no request before a 429's wait was over", early == 0)
    result.check("no duplicates", result.duplicated == 0)
    result.check("nothing lost", accounting.lost == 0 and accounting.unfinished == 0)
    return result
