"""Measurement 5: the worker with many installed portals.

Idle scale: a fresh database holds N installed portals (rows in `portals`) and no events;
the real `hubline worker` runs under `benchmarks.probe`, which counts every database
statement and samples the worker's memory. After a warm-up the statements per poll
cycle (the worker polls every 0.5 s) and the resident memory are compared between 100
and 10,000 portals: work should follow portals with events, not all portals.

The worker's periodic jobs (retention every 10 minutes, the scope check hourly, the
daily property check, which queues one provisioning run per active portal) are marked
as just run by another worker, through the same app-wide leases workers use to run
them once: what is measured is the steady poll loop, the cost paid every half second.
The periodic jobs' cost does follow the number of portals, once an hour or a day.

Fairness: 1,000 portals hold 10 events each, put in the inbox with `app.inbox.enqueue`
(what the webhook route calls after verifying; intake is measured on its own in 3);
the worker, as `hubline worker` builds it but with a fresh registry whose handler does
nothing, drains them. Each portal's delay runs from the worker's start to its last
event finished; the slowest is compared to the median. A trivial handler times the
worker's own scheduling: the real sync cannot serve 1,000 sandbox portals here.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from app.crypto import TokenCipher
from app.db import session_factory, transaction
from app.inbox import NewEvent, enqueue
from app.models import EventSource, Lease, Portal, PortalStatus, utcnow
from app.settings import REQUIRED_SCOPES
from benchmarks import harness
from benchmarks.context import Bench
from benchmarks.report import Row, verdict

FIRST_PORTAL = 50_000_000
WARMUP_SECONDS = 2.0
IDLE_SECONDS = 5.0
POLL_SECONDS = 0.5  # Worker's default poll interval
FLAT_TOLERANCE = 1.25  # "flat": the large case costs at most this much more than the small
FAIRNESS_TARGET = 3.0
# The worker's periodic jobs (app.worker, app.lifecycle, app.properties), by lease name.
PERIODIC_JOBS = ("retention", "journal", "scope-check", "properties-daily")


async def add_portals(database_url: str, count: int) -> None:
    """`count` installed, active portals, as installs leave them (no events)."""
    now = utcnow()
    async with harness.engine_for(database_url) as engine, engine.begin() as connection:
        for start in range(0, count, 2_000):
            await connection.execute(
                sa.insert(Portal),
                [
                    {
                        "portal_id": FIRST_PORTAL + n,
                        "hub_domain": f"portal-{n}.example.test",
                        "status": PortalStatus.active,
                        "install_generation": 1,
                        "scopes": REQUIRED_SCOPES,
                        "installed_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for n in range(start, min(count, start + 2_000))
                ],
            )


async def hold_periodic_leases(database_url: str) -> None:
    """Record the periodic jobs as just run by another worker (their leases held for a day)."""
    until = utcnow() + timedelta(days=1)
    async with harness.engine_for(database_url) as engine, engine.begin() as connection:
        await connection.execute(
            sa.insert(Lease),
            [
                {"name": name, "owner": "an-earlier-worker", "expires_at": until}
                for name in PERIODIC_JOBS
            ],
        )


async def run_probe(
    bench: Bench,
    name: str,
    database_url: str,
    *,
    noop: bool = False,
    until: Any = None,
    seconds: float = IDLE_SECONDS,
) -> dict[str, Any]:
    """Run the worker under the probe until `until()` holds (or for `seconds`); its stats."""
    stats_file = bench.work_dir / f"{name}.json"
    args = [harness.PYTHON, "-m", "benchmarks.probe", "--stats", str(stats_file)]
    args += ["--noop-worker"] if noop else ["--", "worker", "--log-level", "warning"]
    env = harness.hubline_environment(
        database_url=database_url, sandbox_url=bench.sandbox.url, public_url="http://127.0.0.1"
    )
    proc = await bench.stack.start(name, args, env=env)
    if until is None:
        await asyncio.sleep(seconds)
    else:
        await harness.wait_for(until, timeout=seconds, every=0.1)
    await bench.stack.stop(proc)
    stats: dict[str, Any] = json.loads(await asyncio.to_thread(stats_file.read_text))
    return stats


def idle_cost(stats: dict[str, Any]) -> dict[str, float]:
    """Statements per poll cycle and memory after the warm-up."""
    timeline = [t for t in stats["timeline"] if t[0] >= WARMUP_SECONDS]
    if len(timeline) < 2:
        raise RuntimeError("the worker ran too briefly to measure")
    (t0, n0, _), (t1, n1, rss) = timeline[0], timeline[-1]
    per_second = (n1 - n0) / (t1 - t0)
    return {
        "statements_per_cycle": per_second * POLL_SECONDS,
        "statements_per_second": per_second,
        "rss_mib": rss,
        "max_rss_mib": stats["max_rss_mib"],
        "statement_ms_per_second": 1000 * stats["statement_seconds"] / stats["seconds"],
    }


async def measure_idle(bench: Bench, kind: str) -> dict[int, dict[str, float]]:
    results = {}
    for count in bench.options.scale_portals:
        database_url = await bench.databases.fresh(kind, f"scale_{count}")
        await add_portals(database_url, count)
        await hold_periodic_leases(database_url)
        stats = await run_probe(bench, f"worker-idle-{kind}-{count}", database_url)
        results[count] = idle_cost(stats)
    return results


async def enqueue_backlog(database_url: str, portals: int, per_portal: int) -> None:
    """`per_portal` events for each portal, interleaved in time as live traffic would be."""
    cipher = TokenCipher.from_setting(harness.BENCH_KEY)
    started = datetime.now(UTC) - timedelta(minutes=5)
    async with harness.engine_for(database_url) as engine:
        sessions = session_factory(engine)
        for round_ in range(per_portal):
            async with transaction(sessions) as session:
                for n in range(portals):
                    portal_id = FIRST_PORTAL + n
                    await enqueue(
                        NewEvent(
                            portal_id=portal_id,
                            source=EventSource.receptionist,
                            type="call.completed",
                            idempotency_key=f"fair-{portal_id}-{round_}",
                            occurred_at=started + timedelta(milliseconds=round_ * portals + n),
                            payload={"id": f"fair-{round_}", "type": "call.completed"},
                        ),
                        session=session,
                        cipher=cipher,
                    )


async def measure_fairness(bench: Bench, kind: str) -> dict[str, Any]:
    options = bench.options
    database_url = await bench.databases.fresh(kind, "fairness")
    await add_portals(database_url, options.fairness_portals)
    await hold_periodic_leases(database_url)
    await enqueue_backlog(database_url, options.fairness_portals, options.fairness_events)
    total = options.fairness_portals * options.fairness_events

    async def drained() -> bool:
        query = "SELECT count(*) FROM events WHERE status IN ('done', 'skipped', 'failed')"
        return int(await harness.scalar(database_url, query)) >= total

    started_at = datetime.now(UTC)
    started = time.monotonic()
    stats = await run_probe(
        bench, f"worker-fairness-{kind}", database_url, noop=True, until=drained, seconds=240
    )
    wall = time.monotonic() - started
    async with harness.engine_for(database_url) as engine, engine.connect() as connection:
        rows = await connection.execute(
            sa.text("SELECT portal_id, max(finished_at) FROM events GROUP BY portal_id")
        )
        finishes = [harness.as_utc(last) for _, last in rows]
        unfinished = int(
            (
                await connection.execute(
                    sa.text("SELECT count(*) FROM events WHERE finished_at IS NULL")
                )
            ).scalar_one()
        )
    delays = [(last - started_at).total_seconds() for last in finishes if last is not None]
    median = statistics.median(delays)
    return {
        "portals": options.fairness_portals,
        "events": total,
        "unfinished": unfinished,
        "wall_s": wall,
        "median_delay_s": median,
        "slowest_delay_s": max(delays),
        "fastest_delay_s": min(delays),
        "slowest_over_median": max(delays) / median if median else None,
        "events_per_s": total / max(delays),
        "statements_per_event": stats["statements"] / total,
    }


async def measure(bench: Bench) -> None:
    kinds = ["sqlite", "postgres"] if bench.databases.has_postgres else ["sqlite"]
    small, large = bench.options.scale_portals
    report = bench.report
    results: dict[str, Any] = {"idle": {}, "fairness": {}}
    for kind in kinds:
        idle = await measure_idle(bench, kind)
        results["idle"][kind] = idle
        a, b = idle[small], idle[large]
        statements_flat = b["statements_per_cycle"] <= a["statements_per_cycle"] * FLAT_TOLERANCE
        memory_flat = b["rss_mib"] <= a["rss_mib"] * FLAT_TOLERANCE
        report.add(
            Row(
                f"5. idle worker, {kind}: statements per poll",
                f"{b['statements_per_cycle']:.1f} @ {large:,}",
                f"{a['statements_per_cycle']:.1f} @ {small:,}",
                _ratio(b["statements_per_cycle"], a["statements_per_cycle"]),
                "flat",
                verdict(statements_flat),
                f"{b['statements_per_second']:.1f} vs {a['statements_per_second']:.1f} "
                f"statements per second, over {IDLE_SECONDS - WARMUP_SECONDS:g}s after a "
                f"{WARMUP_SECONDS:g}s warm-up; the periodic jobs (hourly, daily) were marked "
                "as just run by another worker",
            )
        )
        report.add(
            Row(
                f"5. idle worker, {kind}: memory (RSS MiB)",
                f"{b['rss_mib']:.0f} @ {large:,}",
                f"{a['rss_mib']:.0f} @ {small:,}",
                _ratio(b["rss_mib"], a["rss_mib"]),
                "flat",
                verdict(memory_flat),
            )
        )
    fairness_kind = kinds[-1]
    fairness = await measure_fairness(bench, fairness_kind)
    results["fairness"][fairness_kind] = fairness
    ratio_ = fairness["slowest_over_median"]
    report.add(
        Row(
            f"5. fairness, {fairness_kind}: slowest / median portal delay",
            f"{fairness['slowest_delay_s']:.1f}s / {fairness['median_delay_s']:.1f}s",
            "-",
            f"{ratio_:.2f}x" if ratio_ else "-",
            f"<= {FAIRNESS_TARGET:g}x",
            verdict(
                None if ratio_ is None else ratio_ <= FAIRNESS_TARGET and not fairness["unfinished"]
            ),
            f"{fairness['portals']:,} portals x {bench.options.fairness_events} events "
            f"drained by one worker (trivial handler) in {fairness['slowest_delay_s']:.1f}s "
            f"({fairness['events_per_s']:.0f} events/s, "
            f"{fairness['statements_per_event']:.1f} statements per event)",
        )
    )
    report.results["scale"] = results


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"
