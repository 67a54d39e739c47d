"""Run a real `hubline` command with its database statements, memory and CPU counted.

    python -m benchmarks.probe --stats FILE -- worker --log-level warning

It listens to SQLAlchemy's `before_cursor_execute`/`after_cursor_execute` on every
engine the command creates (the listener sits on the Engine class, so the command's own
code is untouched), runs `app.cli.main` with the arguments after `--`, and when the
command ends (a `hubline worker` ends gracefully on SIGTERM) writes one JSON object to
FILE: statements, time spent in them, statements per kind, peak and current resident
memory, CPU time, and a timeline of (seconds since start, statements so far, RSS MiB)
sampled every 0.5 s, from which a caller computes the cost of any window it likes.

`--noop-worker` runs, instead of a command, the worker exactly as `hubline worker` builds
it but given a fresh handler registry whose one handler does nothing: the fairness
measurement uses it to time the worker's own scheduling, without HubSpot in the way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from benchmarks.harness import rss_mib

SAMPLE_SECONDS = 0.5
NOOP_TYPES = ("call.completed", "text.received", "chat.completed")


class StatementCounter:
    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.kinds: Counter[str] = Counter()
        self._lock = threading.Lock()  # aiosqlite runs statements on its own threads

    def before(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        with self._lock:
            self.count += 1
            self.kinds[statement.lstrip().split(" ", 1)[0].upper() or "?"] += 1

    def install(self) -> None:
        event.listen(Engine, "before_cursor_execute", self.before)
        event.listen(Engine, "before_cursor_execute", self._start, retval=False)
        event.listen(Engine, "after_cursor_execute", self._stop)

    @staticmethod
    def _start(conn: Any, *_args: Any) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def _stop(self, conn: Any, *_args: Any) -> None:
        started = conn.info.get("bench_started")
        if started:
            elapsed = time.perf_counter() - started.pop()
            with self._lock:
                self.seconds += elapsed


async def run_noop_worker() -> int:
    """`hubline worker` (app.cli.cmd_worker) with a fresh registry whose handler does nothing."""
    from app.cli import settings_from_environment
    from app.inbox import EventView, HandlerContext, Registry
    from app.logs import configure_logging
    from app.main import close_services, open_services
    from app.worker import build_worker

    registry = Registry()

    @registry.handler(*NOOP_TYPES, batch_size=100)
    async def noop(_context: HandlerContext, _events: list[EventView]) -> None:
        return None

    configure_logging("warning")
    resources = await open_services(settings_from_environment())
    try:
        await build_worker(resources, registry=registry).run_until_signalled()
    finally:
        await close_services(resources)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--noop-worker", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = [c for c in args.command if c != "--"]
    counter = StatementCounter()
    counter.install()
    started = time.monotonic()
    timeline: list[tuple[float, int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            timeline.append((time.monotonic() - started, counter.count, rss_mib("self")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = 1
    try:
        if args.noop_worker:
            code = asyncio.run(run_noop_worker())
        else:
            from app.cli import main as hubline

            code = hubline(command)
    finally:
        stop.set()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        args.stats.write_text(
            json.dumps(
                {
                    "exit_code": code,
                    "seconds": time.monotonic() - started,
                    "statements": counter.count,
                    "statement_seconds": counter.seconds,
                    "kinds": dict(counter.kinds),
                    "max_rss_mib": usage.ru_maxrss / 1024,
                    "rss_mib": rss_mib("self"),
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                    "timeline": timeline,
                }
            )
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
