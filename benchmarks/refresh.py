"""Measurement 4: 200 concurrent HubSpot calls for a portal whose access token just expired.

Two sandbox portals are installed into a fresh Hubline database through the OAuth flow
(`hubline serve`). Hubline's own HubSpot client (`app.hubspot.hubspot_client`, with its
refresh middleware and rate budget) sends concurrent calls from this process over
HTTP: 200 for a portal whose token has just expired, both at the sandbox (which would
answer 401) and in Hubline's vault, after 100 for a portal whose token is fresh (the
reference). The sandbox counts the refresh grants. Hubline's budget (100 requests per
10 s) sends the first 100 calls of a burst at once and the next 100 ten seconds later,
so the added latency compares the first 100 answers of each burst.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from app.errors import HubSpotError
from app.hubspot import hubspot_client
from app.main import Services, close_services, open_services
from app.models import utcnow
from app.settings import load_settings
from benchmarks import harness
from benchmarks.context import Bench
from benchmarks.report import Row, verdict

FRESH_PORTAL = 1002
EXPIRED_PORTALS = (1003, 1001)
CALL_PATH = "/crm/v3/objects/contacts"
FIRST_WAVE = 100  # what Hubline's budget (HUBSPOT_REQUESTS_PER_10S) lets out at once


async def burst(services: Services, portal_id: int, calls: int) -> tuple[list[float], int]:
    """`calls` concurrent GETs for one portal: each call's latency (s, sorted), and failures."""
    client = hubspot_client(services, portal_id)
    started = time.perf_counter()

    async def one() -> float | None:
        try:
            await client.get_json(CALL_PATH, params={"limit": 1})
        except HubSpotError:
            return None
        return time.perf_counter() - started

    results = await asyncio.gather(*(one() for _ in range(calls)))
    latencies = sorted(r for r in results if r is not None)
    return latencies, calls - len(latencies)


async def expire(bench: Bench, database_url: str, portal_id: int) -> None:
    """The portal's access token expires now, at HubSpot and in Hubline's vault."""
    await bench.sandbox.expire_tokens(portal_id)
    async with harness.engine_for(database_url) as engine, engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE oauth_tokens SET expires_at = :when WHERE portal_id = :portal"),
            {"when": utcnow() - timedelta(seconds=1), "portal": portal_id},
        )


async def repetition(
    bench: Bench, services: Services, database_url: str, expired_portal: int
) -> dict[str, Any]:
    calls = bench.options.refresh_calls
    sandbox = bench.sandbox
    fresh, fresh_failed = await burst(services, FRESH_PORTAL, min(calls, FIRST_WAVE))
    refreshes_before = await sandbox.refresh_count(expired_portal)
    counts_before = await sandbox.request_counts(expired_portal)
    await expire(bench, database_url, expired_portal)
    expired, expired_failed = await burst(services, expired_portal, calls)
    counts = (await sandbox.request_counts(expired_portal)) - counts_before
    first_wave = min(FIRST_WAVE, len(fresh), len(expired))
    fresh_p50 = statistics.median(fresh[:first_wave]) * 1000
    expired_p50 = statistics.median(expired[:first_wave]) * 1000
    return {
        "portal_id": expired_portal,
        "refresh_requests": await sandbox.refresh_count(expired_portal) - refreshes_before,
        "succeeded": len(expired),
        "failed": {"fresh": fresh_failed, "expired": expired_failed},
        "rejected_401": sum(n for (_, status), n in counts.items() if status == 401),
        "rate_limited_429": sum(n for (_, status), n in counts.items() if status == 429),
        "p50_first_100_ms": {"fresh": fresh_p50, "expired": expired_p50},
        "added_ms": expired_p50 - fresh_p50,
        "first_answer_ms": {"fresh": fresh[0] * 1000, "expired": expired[0] * 1000},
        "last_answer_ms": {"fresh": fresh[-1] * 1000, "expired": expired[-1] * 1000},
    }


async def measure(bench: Bench) -> None:
    calls = bench.options.refresh_calls
    sandbox = bench.sandbox
    kind = "postgres" if bench.databases.has_postgres else "sqlite"
    database_url = await bench.databases.fresh(kind, "refresh")
    web = await harness.start_hubline(
        bench.stack,
        "hubline-refresh",
        database_url=database_url,
        sandbox_url=sandbox.url,
        worker=False,
    )
    for portal_id in (FRESH_PORTAL, *EXPIRED_PORTALS):
        await harness.install_portal(web.url, sandbox.url, portal_id)
    await bench.stack.stop(web)

    settings = load_settings(
        harness.hubline_environment(
            database_url=database_url, sandbox_url=sandbox.url, public_url=web.url
        )
    )
    services = await open_services(settings)
    runs = []
    try:
        for number in range(bench.options.refresh_repetitions):
            # Alternate portals: each burst's second wave fills its portal's 10 s window.
            portal_id = EXPIRED_PORTALS[number % len(EXPIRED_PORTALS)]
            runs.append(await repetition(bench, services, database_url, portal_id))
    finally:
        await close_services(services)

    refreshes = [r["refresh_requests"] for r in runs]
    added = statistics.median(r["added_ms"] for r in runs)
    middle = sorted(runs, key=lambda r: r["added_ms"])[len(runs) // 2]
    bench.report.add(
        Row(
            f"4. refresh, {calls} concurrent calls: refresh requests",
            f"{max(refreshes)}",
            "-",
            "-",
            "1",
            verdict(all(n == 1 for n in refreshes) and all(r["succeeded"] == calls for r in runs)),
            f"{kind}; {len(runs)} repetitions: refresh grants {refreshes}; calls that "
            f"succeeded {[r['succeeded'] for r in runs]}; the sandbox answered "
            f"{sum(r['rejected_401'] for r in runs)} with 401 and "
            f"{sum(r['rate_limited_429'] for r in runs)} with 429",
        )
    )
    bench.report.add(
        Row(
            "4. refresh: added latency (p50, first 100 calls)",
            f"+{added:.0f} ms",
            f"{middle['p50_first_100_ms']['fresh']:.0f} ms (fresh token)",
            "-",
            "-",
            verdict(None),
            "median of the repetitions: "
            + ", ".join(f"+{r['added_ms']:.0f}" for r in runs)
            + " ms; in the middle one, the first answer came after "
            f"{middle['first_answer_ms']['expired']:.0f} ms vs "
            f"{middle['first_answer_ms']['fresh']:.0f} ms with a fresh token",
        )
    )
    bench.report.results["refresh"] = {
        "database": kind,
        "calls": calls,
        "added_ms_median": added,
        "repetitions": runs,
    }
