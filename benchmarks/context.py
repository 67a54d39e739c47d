"""What one benchmark run shares across its measurements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.harness import Databases, Sandbox, Stack
from benchmarks.report import Report


@dataclass(frozen=True)
class Options:
    """The volumes and durations of a run (defaults: issue 9's)."""

    # Issue 9's volume is the most the drain sends; delivery through the webhook stops
    # after `drain_delivery_s` and the drain after `drain_deadline_s`, so the whole run
    # fits its 10 minutes on 2 cores (on this machine 6,000 to 9,000 events get in).
    drain_events: int = 20_000
    drain_delivery_s: float = 45.0
    drain_deadline_s: float = 110.0
    baseline_events: int = 300
    intake_seconds: float = 5.0
    intake_rounds: int = 3
    intake_concurrency: int = 50
    refresh_calls: int = 200
    refresh_repetitions: int = 3
    scale_portals: tuple[int, int] = (100, 10_000)
    fairness_portals: int = 1_000
    fairness_events: int = 10
    # "postgres" when a PostgreSQL server was provisioned, else "sqlite".
    drain_database: str = "postgres"
    load_tool: str = "auto"  # "wrk", "aiohttp" or "auto" (wrk when installed)


@dataclass
class Bench:
    options: Options
    work_dir: Path
    http: httpx.AsyncClient
    stack: Stack
    databases: Databases
    sandbox: Sandbox
    report: Report
