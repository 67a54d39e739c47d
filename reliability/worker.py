"""A worker process for runs and tests: Hubline's worker with a chosen lease, or a broken one.

`python -m reliability.worker [--lease-seconds S] [--concurrency N] [--broken]`

The real worker is `hubline worker` (30 s leases); a shorter lease lets the fast
regression tests take over a killed worker's portals in seconds. `--broken` runs a
worker that marks every batch done *before* handling it: a crash or a transient
HubSpot failure then loses events, which the harness must report (run 2).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from app.inbox import Done, EventView, HandlerContext, read_payload
from app.logs import configure_logging
from app.main import close_services, open_services
from app.settings import load_settings
from app.worker import Worker, _Batch, build_worker

log = logging.getLogger(__name__)


class MarksDoneFirstWorker(Worker):
    """The bug run 2 plants: acknowledge the batch, then try the work."""

    async def _run_batch(self, batch: _Batch, context: HandlerContext) -> bool:
        await self._record(batch, {row.id: Done() for row in batch.events if row.id is not None})
        views = [
            EventView.of(row, read_payload(row, self.services.cipher))
            for row in batch.events
            if row.id is not None
        ]
        try:
            await batch.spec.handle(context, views)
        except Exception as error:
            log.warning("handler failed after its batch was marked done: %s", type(error).__name__)
        return True


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m reliability.worker")
    parser.add_argument("--lease-seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--broken", action="store_true")
    args = parser.parse_args()
    configure_logging("warning")
    services = await open_services(load_settings(env_file=None))
    try:
        if args.broken:
            from app import lifecycle, properties

            worker: Worker = MarksDoneFirstWorker(
                services, concurrency=args.concurrency, lease_seconds=args.lease_seconds
            )
            lifecycle.add_periodic_jobs(worker, services.settings)
            properties.register_periodic(worker)
        else:
            worker = build_worker(
                services, concurrency=args.concurrency, lease_seconds=args.lease_seconds
            )
        await worker.run_until_signalled()
    finally:
        await close_services(services)


if __name__ == "__main__":
    asyncio.run(main())
