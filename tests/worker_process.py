"""A real worker process for the crash and signal tests, with test handlers.

Settings come from the environment. `test.work` events sleep HANDLER_SECONDS, then
record (in the completion transaction) which worker handled them and when; the
tests read that table to prove exactly-once completion and exclusive leases.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.inbox import Done, EventView, HandlerContext, Outcome, Registry
from app.logs import configure_logging
from app.main import close_services, open_services
from app.retry import RetryPolicy
from app.settings import load_settings
from app.worker import Worker

registry = Registry()
HANDLER_SECONDS = float(os.environ.get("HANDLER_SECONDS", "0"))


def _record(event_id: int, portal_id: int, worker_id: str, started: float) -> Done:
    async def write(session: AsyncSession) -> None:
        await session.execute(
            sa.text(
                "INSERT INTO test_handled (event_id, portal_id, worker, started, finished) "
                "VALUES (:e, :p, :w, :s, :f)"
            ),
            {"e": event_id, "p": portal_id, "w": worker_id, "s": started, "f": time.time()},
        )

    return Done(write=write)


@registry.handler("test.work", batch_size=int(os.environ.get("BATCH_SIZE", "10")))
async def work(context: HandlerContext, events: list[EventView]) -> dict[int, Outcome]:
    started = time.time()
    print("handling", ",".join(str(e.id) for e in events), flush=True)
    await asyncio.sleep(HANDLER_SECONDS)
    return {e.id: _record(e.id, context.portal_id, context.worker_id, started) for e in events}


def print_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def main() -> None:
    # Logs and, on request, stacks go to stderr, which the tests show when a worker hangs.
    configure_logging("INFO")
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, print_tasks)
    settings = load_settings(dict(os.environ))
    services = await open_services(settings)
    worker = Worker(
        services,
        registry=registry,
        concurrency=int(os.environ.get("CONCURRENCY", "4")),
        lease_seconds=float(os.environ.get("LEASE_SECONDS", "2")),
        poll_seconds=0.05,
        grace_seconds=float(os.environ.get("GRACE_SECONDS", "0.2")),
        worker_id=os.environ.get("WORKER_ID"),
        retry_policy=RetryPolicy(
            ambiguous_write_min_delay=float(os.environ.get("AMBIGUOUS_WRITE_DELAY", "15"))
        ),
    )
    print("ready", flush=True)
    try:
        await worker.run_until_signalled()
    finally:
        await close_services(services)
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
