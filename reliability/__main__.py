"""`python -m reliability`: run the reliability and security runs and print the report.

Use `reliability/run`, which provisions a throwaway PostgreSQL server first (run 3 stops
and starts it). `--runs 1,2,8` picks runs; `--scale 0.1` shrinks the event counts of
runs 1 and 2; `--soak-minutes` sets run 9's length.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from reliability.report import RunResult, table, write_json
from reliability.stack import Postgres

if TYPE_CHECKING:
    from reliability.crash import CrashConfig

RunFunction = Callable[[Postgres, Path, argparse.Namespace], Awaitable[RunResult]]


async def _run_1(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.crash import run_crashes

    return await run_crashes(postgres, logs, _crash_config(args))


async def _run_2(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.crash import run_broken_worker

    return await run_broken_worker(postgres, logs, _crash_config(args))


def _crash_config(args: argparse.Namespace) -> CrashConfig:
    from reliability.crash import CrashConfig

    return CrashConfig(
        events=max(100, int(5000 * args.scale)),
        kills=max(3, int(50 * min(1.0, args.scale * 2))),
        seed=args.seed,
    )


async def _run_3(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.outage import run_outage

    return await run_outage(postgres, logs, seconds=args.outage_seconds)


async def _run_4(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.faults import run_hubspot_faults

    return await run_hubspot_faults(postgres, logs, seed=args.seed)


async def _run_5(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.uninstall import run_uninstall

    return await run_uninstall(postgres, logs)


async def _run_6(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.rotation import run_rotation

    return await run_rotation(postgres, logs, secrets=args.rotation_secrets, seed=args.seed)


async def _run_7(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.isolation import run_isolation

    return await run_isolation(postgres, logs, seed=args.seed)


async def _run_8(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.hostile import run_hostile

    return await run_hostile(postgres, logs, examples=args.hostile_examples, seed=args.seed)


async def _run_9(postgres: Postgres, logs: Path, args: argparse.Namespace) -> RunResult:
    from reliability.soak import run_soak

    return await run_soak(postgres, logs, minutes=args.soak_minutes, seed=args.seed)


RUNS: dict[int, tuple[str, RunFunction]] = {
    1: ("worker crashes", _run_1),
    2: ("broken worker", _run_2),
    3: ("database outage", _run_3),
    4: ("HubSpot faults", _run_4),
    5: ("uninstall under load", _run_5),
    6: ("key rotation", _run_6),
    7: ("tenant isolation", _run_7),
    8: ("hostile input", _run_8),
    9: ("soak", _run_9),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reliability/run", description=__doc__)
    parser.add_argument("--runs", default="1,2,3,4,5,6,7,8,9", help="comma-separated run numbers")
    parser.add_argument("--scale", type=float, default=1.0, help="event-count factor, runs 1-2")
    parser.add_argument("--soak-minutes", type=float, default=30.0)
    parser.add_argument("--outage-seconds", type=float, default=20.0)
    parser.add_argument("--rotation-secrets", type=int, default=10_000)
    parser.add_argument("--hostile-examples", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=20260302)
    parser.add_argument("--output", type=Path, default=None, help="JSON report path")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (reliability/run passes it on) cancels the run, so every `finally` stops
    # the processes that run started.
    current = asyncio.current_task()
    if current is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    postgres = Postgres.from_environment()
    chosen = [int(part) for part in args.runs.split(",") if part.strip()]
    logs_root = Path(tempfile.mkdtemp(prefix="hubline-reliability-"))
    print(f"process logs: {logs_root}", file=sys.stderr)
    results: list[RunResult] = []
    for number in chosen:
        name, function = RUNS[number]
        print(f"\n== run {number}: {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            result = await function(postgres, logs_root / f"run{number}", args)
        except Exception as error:
            traceback.print_exc()
            result = RunResult(number, name, "(run did not finish)", error=repr(error)[:500])
        result.seconds = time.monotonic() - started
        results.append(result.settle())
        print(table([result]), file=sys.stderr, flush=True)
    print()
    print(table(results))
    path = write_json(
        results,
        args.output,
        command="reliability/run " + " ".join(sys.argv[1:] if argv is None else argv),
        logs=str(logs_root),
    )
    print(f"\nwrote {path}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process the run started was stopped", file=sys.stderr)
        sys.exit(130)
