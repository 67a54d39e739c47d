"""Hubline's benchmarks (issue 9): every measurement, over real HTTP, in one table.

Run from the repository root:

    benchmarks/run              # fresh clone: virtualenv, PostgreSQL, wrk, then this module
    python -m benchmarks.run    # in a ready environment (HUBLINE_BENCH_POSTGRES_URL: an
                                # admin URL of a PostgreSQL server; without it the
                                # PostgreSQL rows are skipped)

It starts the HubSpot sandbox (HubSpot's real limits: 110 requests per rolling 10 s and
5 searches per second per portal, plus 50 ms on every request), `hubline serve`
processes and a bare Starlette endpoint on free 127.0.0.1 ports, and measures:

1. HubSpot requests per 100 receptionist events (realistic mix), Hubline vs the baseline;
2. drain speed of one portal under those limits, vs the baseline and vs Hubline's own
   budget ceiling, and the 429s it met;
3. intake: receptionist webhooks/s and p50/p99 latency at 50 concurrent senders, Hubline on
   SQLite and on PostgreSQL vs the bare endpoint;
4. refresh: 200 concurrent calls for a portal whose token just expired;
5. scale: the worker's memory and per-cycle database cost with 100 vs 10,000 idle portals,
   and fairness when 1,000 portals have 10 events each.

Each ratio is against a reference measured in the same run (this machine is shared and
noisy). The table goes to stdout; the numbers behind it to benchmarks/results/latest.json.
The measurements take about 5 minutes on 2 cores (4 min 22 s for the README's table). `--quick`
runs small volumes (a smoke test of the harness, not numbers to quote).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from benchmarks import drain, harness
from benchmarks.context import Bench, Options
from benchmarks.report import Report, Row

RESULTS = harness.REPO / "benchmarks" / "results" / "latest.json"
MEASUREMENTS = ("drain", "intake", "refresh", "scale")

Measure = Callable[[Bench], Awaitable[None]]


def measurement(name: str) -> Measure:
    # Imported lazily, so one measurement's import problem does not stop the others.
    if name == "drain":
        return drain.measure
    if name == "intake":
        from benchmarks import intake

        return intake.measure
    if name == "refresh":
        from benchmarks import refresh

        return refresh.measure
    from benchmarks import scale

    return scale.measure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", action="append", choices=MEASUREMENTS, help="run only these (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="small volumes: a harness check")
    parser.add_argument("--drain-events", type=int, help="Hubline's drain volume (20000)")
    parser.add_argument("--baseline-events", type=int, help="the baseline's sample (300)")
    parser.add_argument("--load-tool", choices=["auto", "wrk", "aiohttp"], default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"where the JSON results go (default: {RESULTS.relative_to(harness.REPO)} for a "
        "full run; a temporary file otherwise, so a partial run never replaces it)",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def options_from(args: argparse.Namespace, *, has_postgres: bool) -> Options:
    defaults = Options()
    values: dict[str, object] = {
        "drain_database": "postgres" if has_postgres else "sqlite",
        "load_tool": args.load_tool,
    }
    if args.quick:
        values |= {
            "drain_events": 600,
            "baseline_events": 20,
            "drain_delivery_s": 30.0,
            "drain_deadline_s": 60.0,
            "intake_seconds": 2.0,
            "intake_rounds": 1,
            "refresh_repetitions": 1,
            "scale_portals": (100, 1_000),
            "fairness_portals": 100,
        }
    if args.drain_events:
        values["drain_events"] = args.drain_events
    if args.baseline_events:
        values["baseline_events"] = args.baseline_events
    return Options(**{**defaults.__dict__, **values})


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    postgres_url = os.environ.get("HUBLINE_BENCH_POSTGRES_URL", "")
    options = options_from(args, has_postgres=bool(postgres_url))
    work_dir = Path(tempfile.mkdtemp(prefix="hubline-bench-"))
    report = Report()
    databases = harness.Databases(work_dir, postgres_url)
    if not postgres_url:
        report.notes.append(
            "HUBLINE_BENCH_POSTGRES_URL was not set: PostgreSQL rows were skipped "
            "(benchmarks/run provisions a server)."
        )
    failed = False
    try:
        async with (
            httpx.AsyncClient(timeout=60.0) as http,
            harness.Stack(work_dir) as stack,
        ):
            sandbox = await harness.start_sandbox(stack, http, latency=0.05)
            bench = Bench(options, work_dir, http, stack, databases, sandbox, report)
            for name in args.only or MEASUREMENTS:
                step = time.monotonic()
                print(f"== {name}", file=sys.stderr, flush=True)
                try:
                    await measurement(name)(bench)
                except Exception as error:
                    failed = True
                    traceback.print_exc()
                    report.add(Row(f"{name}: did not complete", "-", note=repr(error)[:300]))
                print(f"   {name} took {time.monotonic() - step:.0f}s", file=sys.stderr, flush=True)
    finally:
        await databases.drop_all()
        if args.keep:
            print(f"work folder kept: {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    report.notes.append(f"whole run: {elapsed:.0f}s on {os.cpu_count()} CPUs")
    print(report.table())
    output = args.output
    if output is None:
        partial = args.quick or args.only or args.drain_events or args.baseline_events
        output = work_dir.with_name(work_dir.name + ".json") if partial else RESULTS
    command = " ".join(["benchmarks/run", *args.argv])
    report.write_json(output, command=command, elapsed_s=elapsed)
    shown = output
    if shown.is_relative_to(harness.REPO):
        shown = shown.relative_to(harness.REPO)
    print(f"\nresults written to {shown}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
