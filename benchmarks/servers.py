"""The servers the benchmarks start besides `hubline serve`, each in a process of its own.

    python -m benchmarks.servers sandbox --port P --client-id ID --client-secret S [--latency 0.05]
    python -m benchmarks.servers bare --port P
    python -m benchmarks.servers bound --port P --database-path FILE   (env: BOUND_SECRET,
        TOKEN_ENCRYPTION_KEYS)

All are served by uvicorn exactly as `hubline serve` serves Hubline (one process,
`log_config=None`, `access_log=False`, `lifespan="on"`, on the event loop
`app.cli.run_async` picks, with uvicorn's default HTTP parser), so the bare endpoint
and the bound (benchmarks/intake_bound.py) differ from Hubline only in what they do with
a request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from app.cli import run_async
from app.sandbox import SandboxConfig, serve_sandbox
from benchmarks.intake_bound import IntakeBound

RECEPTIONIST_ROUTE = "/webhooks/portals/{portal_id}/receptionist"


async def bare_receptionist(request: Request) -> Response:
    """Read the body and answer 200 without verifying or storing anything."""
    await request.body()
    return JSONResponse({"status": "accepted"})


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def bare_app() -> Starlette:
    return Starlette(
        routes=[
            Route(RECEPTIONIST_ROUTE, bare_receptionist, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )


async def serve(app: ASGIApp, host: str, port: int) -> None:
    # The same uvicorn.Config arguments as app.cli.cmd_serve.
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="on"
    )
    await uvicorn.Server(config).serve()


def bound_app(database_path: str) -> IntakeBound:
    return IntakeBound(
        database_path=database_path,
        secret=os.environ["BOUND_SECRET"],
        encryption_keys=os.environ["TOKEN_ENCRYPTION_KEYS"],
    )


def sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        public_url=f"http://{args.host}:{args.port}",
        latency_seconds=args.latency,
        search_lag_seconds=args.search_lag,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.servers")
    parser.add_argument("kind", choices=["sandbox", "bare", "bound"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", default="bench-client-id")
    parser.add_argument("--client-secret", default="bench-client-secret")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--search-lag", type=float, default=0.0)
    parser.add_argument("--database-path", help="bound: the migrated SQLite file to store in")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        if args.kind == "bare":
            run_async(serve(bare_app(), args.host, args.port))
        elif args.kind == "bound":
            run_async(serve(bound_app(args.database_path), args.host, args.port))
        else:
            run_async(serve_sandbox(sandbox_config(args), host=args.host, port=args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
