"""Run 9: a soak at twice a busy portal's traffic across 50 portals, restarting a worker often.

A busy receptionist handles about 60 calls, texts and chats an hour at its peak; the
soak sends twice that to each of 50 portals (100 events a minute in all) for
`--soak-minutes`, restarting a worker (SIGTERM, as a deploy does) every 5 minutes.
Nothing may be lost, the oldest pending event stays under 60 s at p99, and the web
process's memory, the workers' memory and the database connections stay flat
(within 10%, comparing the window after warm-up with the last one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa

from app import db
from reliability.crash import wait_drained
from reliability.report import RunResult, say
from reliability.stack import Postgres, Stack, running_stack
from reliability.traffic import DeliveryLog, PlannedEvent, deliver, plan_events
from reliability.verify import account

FIRST_PORTAL = 9001
BUSY_PORTAL_PER_HOUR = 60
FLAT_TOLERANCE = 0.10
# Pools open and close connections as load wobbles; a change this small is not a leak.
CONNECTION_SLACK = 2


@dataclass
class Samples:
    at: list[float] = field(default_factory=list)
    oldest_pending: list[float] = field(default_factory=list)
    web_rss: list[float] = field(default_factory=list)
    worker_rss: list[float] = field(default_factory=list)
    connections: list[float] = field(default_factory=list)


async def oldest_pending_seconds(database_url: str) -> float:
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        async with engine.connect() as connection:
            query = sa.text(
                "SELECT EXTRACT(EPOCH FROM now() - min(received_at)) FROM events "
                "WHERE status IN ('pending', 'in_progress') AND source = 'receptionist'"
            )
            value = (await connection.execute(query)).scalar_one()
            return float(value or 0.0)
    finally:
        await engine.dispose()


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux, where the suite runs)."""
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def sample(stack: Stack, postgres: Postgres, samples: Samples, stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        samples.at.append(time.monotonic() - started)
        samples.oldest_pending.append(await oldest_pending_seconds(stack.database_url))
        samples.web_rss.append(rss_mib(stack.web.pid) if stack.web else 0.0)
        workers = [rss_mib(p.pid) for p in stack.live_workers()]
        samples.worker_rss.append(max(workers) if workers else 0.0)
        samples.connections.append(await postgres.connections(stack.database_url))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5.0)


def window(values: list[float], at: list[float], start: float, end: float) -> list[float]:
    return [v for v, t in zip(values, at, strict=True) if start <= t <= end]


def growth(early: list[float], late: list[float]) -> float:
    if not early or not late:
        return 0.0
    base = statistics.median(early)
    return (statistics.median(late) - base) / base if base else 0.0


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def run_soak(
    postgres: Postgres,
    log_dir: Path,
    *,
    minutes: float = 30.0,
    portals: int = 50,
    seed: int = 1,
    restart_every_minutes: float = 5.0,
) -> RunResult:
    per_hour = 2 * BUSY_PORTAL_PER_HOUR
    restart_every = min(restart_every_minutes, max(minutes / 3, 0.5)) * 60
    result = RunResult(
        9,
        "soak",
        f"{minutes:g} min, {portals} portals × {per_hour}/h, worker restart every "
        f"{restart_every / 60:g} min",
    )
    rng = random.Random(seed)
    portal_ids = list(range(FIRST_PORTAL, FIRST_PORTAL + portals))
    total = int(portals * per_hour * minutes / 60)
    planned = plan_events(portal_ids, total, rng=rng, prefix="soak", callers_per_portal=200)
    rng.shuffle(planned)
    gap = minutes * 60 / max(1, total)
    log = DeliveryLog()
    samples = Samples()
    restarts = 0
    async with running_stack(postgres, log_dir, portal_ids) as stack:
        await stack.install_all()
        for _ in range(2):
            stack.start_worker("hubline")
        await wait_drained(stack.database_url, timeout=300, source=None)
        say(f"{portals} portals installed; sending {total} events over {minutes:g} min")
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stack, postgres, samples, stop))
        started = time.monotonic()
        next_restart = started + restart_every
        secrets = {p: i.secret for p, i in stack.installed.items()}
        in_flight: set[asyncio.Task[int]] = set()
        async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as client:
            for index, event in enumerate(planned):
                # Arrivals jitter around a steady rate; the schedule itself never stretches.
                due = started + (index + rng.uniform(-0.5, 0.5)) * gap
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(_send(client, secrets, event, log))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if time.monotonic() >= next_restart:
                    victim = stack.live_workers()[0]
                    stack.processes.terminate(victim, grace=25)
                    stack.start_worker("hubline")
                    restarts += 1
                    next_restart += restart_every
                    say(f"restarted a worker ({restarts}); {index}/{total} sent")
            await asyncio.gather(*in_flight)
        sending_seconds = time.monotonic() - started
        drained = await wait_drained(stack.database_url, timeout=600, source="receptionist")
        stop.set()
        await sampler
        elapsed = time.monotonic() - started
        accounting = await account(stack, planned, log.accepted())
    length = samples.at[-1] if samples.at else 0.0
    early = (0.2 * length, 0.4 * length)
    late = (0.8 * length, length)
    web_growth = growth(
        window(samples.web_rss, samples.at, *early), window(samples.web_rss, samples.at, *late)
    )
    worker_growth = growth(
        window(samples.worker_rss, samples.at, *early),
        window(samples.worker_rss, samples.at, *late),
    )
    early_conn = window(samples.connections, samples.at, *early)
    late_conn = window(samples.connections, samples.at, *late)
    conn_growth = growth(early_conn, late_conn)
    conn_delta = (
        (statistics.median(late_conn) - statistics.median(early_conn))
        if early_conn and late_conn
        else 0
    )
    oldest_p99 = p99(samples.oldest_pending)
    result.sent = log.sent
    result.lost = accounting.lost
    result.duplicated = accounting.duplicate_contacts + accounting.duplicate_engagements
    result.details = {
        "minutes": minutes,
        "events": total,
        "events_per_minute_sent": round(log.sent / (sending_seconds / 60), 1),
        "elapsed_s": round(elapsed, 1),
        "worker_restarts": restarts,
        "drained": drained,
        "synced": accounting.synced,
        "failed": accounting.failed_visible,
        "oldest_pending_p99_s": round(oldest_p99, 1),
        "oldest_pending_max_s": round(max(samples.oldest_pending, default=0.0), 1),
        "web_rss_mib_early_late": [
            round(statistics.median(window(samples.web_rss, samples.at, *w)), 1)
            if window(samples.web_rss, samples.at, *w)
            else None
            for w in (early, late)
        ],
        "web_rss_growth": round(web_growth, 3),
        "worker_rss_growth": round(worker_growth, 3),
        "db_connections_early_late": [
            statistics.median(early_conn) if early_conn else None,
            statistics.median(late_conn) if late_conn else None,
        ],
        "db_connections_growth": round(conn_growth, 3),
        "samples": len(samples.at),
    }
    result.check(
        "nothing lost, nothing left pending", accounting.lost == 0 and accounting.unfinished == 0
    )
    result.check("no duplicates", result.duplicated == 0)
    result.check("oldest pending event under 60 s at p99", oldest_p99 < 60)
    result.check("web memory flat (≤ 10%)", web_growth <= FLAT_TOLERANCE)
    result.check("worker memory flat (≤ 10%)", worker_growth <= FLAT_TOLERANCE)
    result.check(
        f"DB connections flat (≤ 10% or ≤ {CONNECTION_SLACK})",
        conn_growth <= FLAT_TOLERANCE or conn_delta <= CONNECTION_SLACK,
    )
    result.check("a worker was restarted", restarts >= 1)
    return result


async def _send(
    client: httpx.AsyncClient, secrets: dict[int, str], event: PlannedEvent, log: DeliveryLog
) -> int:
    return await deliver(client, secrets[event.portal_id], event, log)
