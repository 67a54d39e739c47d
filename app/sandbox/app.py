"""The sandbox application: routes from every part, the webhook dispatcher in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette

from app.sandbox import crm, inspection, journal, marketing, oauth, schemas, ui
from app.sandbox.config import SandboxConfig
from app.sandbox.state import SandboxState
from app.sandbox.webhooks import WebhookDispatcher


def create_sandbox_app(
    config: SandboxConfig | None = None,
    *,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """A local HubSpot; `app.state.sandbox` is its `SandboxState`.

    `webhook_transport` lets tests deliver webhooks in-process (e.g. `httpx.ASGITransport`).
    """
    state = SandboxState(config or SandboxConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(transport=webhook_transport) as client:
            dispatcher = WebhookDispatcher(state, client)
            state.dispatcher = dispatcher
            dispatcher.start()
            try:
                yield
            finally:
                state.dispatcher = None
                await dispatcher.aclose()

    app = Starlette(
        routes=[
            *oauth.routes(),
            *crm.routes(),
            *schemas.routes(),
            *marketing.routes(),
            *journal.routes(),
            *inspection.routes(),
            *ui.routes(),
        ],
        lifespan=lifespan,
    )
    app.state.sandbox = state
    return app


async def serve_sandbox(config: SandboxConfig, *, host: str, port: int) -> None:
    """Serve the sandbox with uvicorn until cancelled."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_sandbox_app(config),
            host=host,
            port=port,
            log_config=None,  # the caller's logging configuration applies
            access_log=False,
            lifespan="on",
            ws="none",
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Let uvicorn close its sockets and run the lifespan shutdown before we go.
        server.should_exit = True
        await task
        raise
