"""Run 3: PostgreSQL stops for 20 seconds while 1,000 deliveries arrive.

Every delivery that did not get a 2xx is redelivered afterwards, as the receptionist
platform would. A 2xx must always mean a stored event; the service must come back by
itself (`/readyz` 503 during the outage, 200 after, the same process throughout).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

import httpx

from app.crypto import TokenCipher
from reliability.report import RunResult, say
from reliability.stack import Postgres, Stack, running_stack
from reliability.traffic import DeliveryLog, PlannedEvent, deliver, plan_events
from reliability.verify import event_hash, inbox_rows

PORTALS = [3001, 3002, 3003, 3004, 3005]


async def watch_readiness(
    stack: Stack, samples: list[tuple[float, int]], stop: asyncio.Event
) -> None:
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=8) as client:
        while not stop.is_set():
            try:
                status = (await client.get("/readyz")).status_code
            except httpx.HTTPError:
                status = 0
            samples.append((time.monotonic(), status))
            await asyncio.sleep(0.25)


async def send_paced(
    stack: Stack, events: list[PlannedEvent], log: DeliveryLog, *, per_second: float
) -> dict[str, int]:
    """Send each event once at a steady pace; the last answer per event id."""
    last: dict[str, int] = {}
    secrets = {p: i.secret for p, i in stack.installed.items()}
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as client:

        async def one(event: PlannedEvent) -> None:
            last[event.event_id] = await deliver(client, secrets[event.portal_id], event, log)

        tasks = []
        for event in events:
            tasks.append(asyncio.create_task(one(event)))
            await asyncio.sleep(1 / per_second)
        await asyncio.gather(*tasks)
    return last


async def run_outage(
    postgres: Postgres, log_dir: Path, *, seconds: float = 20.0, events: int = 1000
) -> RunResult:
    result = RunResult(
        3, "database outage", f"PostgreSQL stopped {seconds:.0f} s while {events} deliveries arrive"
    )
    if not postgres.controllable:
        result.error = "PostgreSQL cannot be stopped here: run reliability/run"
        return result
    planned = plan_events(PORTALS, events, rng=random.Random(3), prefix="outage")
    log = DeliveryLog()
    samples: list[tuple[float, int]] = []
    async with running_stack(postgres, log_dir, PORTALS) as stack:
        stack.start_worker("hubline")
        await stack.install_all()
        stop_watching = asyncio.Event()
        watcher = asyncio.create_task(watch_readiness(stack, samples, stop_watching))
        # Spread the deliveries over the outage and a margin either side.
        pace = events / (seconds + 20.0)
        sending = asyncio.create_task(send_paced(stack, planned, log, per_second=pace))
        try:
            await asyncio.sleep(8.0)
            say("stopping PostgreSQL")
            stopped_at = time.monotonic()
            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(seconds)
            say("starting PostgreSQL")
            await asyncio.to_thread(postgres.start)
            started_at = time.monotonic()
            last = await sending
            retries = 0
            for _round in range(10):
                again = [e for e in planned if not 200 <= last.get(e.event_id, 0) < 300]
                if not again:
                    break
                retries += len(again)
                await asyncio.sleep(2.0)
                last.update(await send_paced(stack, again, log, per_second=50))
            await asyncio.sleep(3.0)
        finally:
            stop_watching.set()
            await watcher
            with contextlib.suppress(Exception):
                if not sending.done():
                    sending.cancel()
        serve_survived = stack.web is not None and stack.web.alive
        rows = await inbox_rows(stack.database_url)
        cipher = TokenCipher.from_setting(stack.key)
    stored = {(row.portal_id, row.idempotency_hash) for row in rows if row.source == "receptionist"}
    acknowledged_without_row = [
        e.event_id
        for e in planned
        if e.event_id in log.accepted() and (e.portal_id, event_hash(cipher, e)) not in stored
    ]
    during = [s for t, s in samples if stopped_at + 2 <= t <= started_at]
    after = [(t, s) for t, s in samples if t > started_at]
    back = next((t for t, s in after if s == 200), None)
    result.sent = log.sent
    result.lost = len(acknowledged_without_row) + max(0, events - len(stored))
    result.duplicated = max(0, len(stored) - events)
    result.details = {
        "deliveries": log.sent,
        "redeliveries": retries,
        "delivery_statuses": log.statuses(),
        "stored_events": len(stored),
        "readyz_during_outage": sorted(set(during)),
        "ready_again_after_s": round(back - started_at, 1) if back else None,
    }
    result.check("never a 2xx without a stored event", not acknowledged_without_row)
    result.check(f"exactly {events} events stored", len(stored) == events)
    result.check(
        "some deliveries refused during the outage", any(s >= 500 or s == 0 for s in log.statuses())
    )
    result.check("/readyz answered 503 during the outage", 503 in during)
    result.check("/readyz back to 200 by itself", back is not None and after[-1][1] == 200)
    result.check("hubline serve never restarted", serve_survived)
    return result
