"""The sandbox HubSpot served by uvicorn for a run: its portals, and a request log kept whole.

`python -m reliability.sandbox_server --port P --portals 2001,2002 [--retry-after]`
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

import uvicorn

from app.sandbox import SandboxConfig, SandboxPortal, create_sandbox_app
from app.sandbox.config import ALL_SCOPES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability.sandbox_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--portals", required=True, help="comma-separated portal ids")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--retry-after", action="store_true", help="429s carry Retry-After")
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    portals = [
        SandboxPortal(int(p), f"portal-{p}.sandbox.hubspot.test", ALL_SCOPES, f"Portal {p}")
        for p in args.portals.split(",")
    ]
    config = SandboxConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        portals=portals,
        public_url=f"http://127.0.0.1:{args.port}",
        send_retry_after=args.retry_after,
    )
    app = create_sandbox_app(config)
    # The checks read every request of a run (which portal, when, what answer), not the
    # last few thousand the UI needs.
    app.state.sandbox.request_log = deque(maxlen=2_000_000)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            timeout_keep_alive=30,
        )
    )
    await server.serve()


if __name__ == "__main__":
    asyncio.run(main())
