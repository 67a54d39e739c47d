"""Fixtures for the sandbox's tests: an in-process sandbox, a manual clock, a webhook receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.sandbox import ManualClock, SandboxConfig, SandboxState, create_sandbox_app
from app.sandbox.testing import install

RECEIVER_URL = "http://receiver.test/webhooks/hubspot"


@dataclass
class ReceivedWebhook:
    """One webhook request the receiver got."""

    url: str
    headers: dict[str, str]
    body: bytes

    def events(self) -> list[dict[str, Any]]:
        """The JSON array of events."""
        import json

        events: list[dict[str, Any]] = json.loads(self.body)
        return events


@dataclass
class Receiver:
    """A stand-in for Hubline's webhook endpoint; answers scripted statuses, then 204."""

    received: list[ReceivedWebhook] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    hang_seconds: float = 0.0

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.received.append(
                ReceivedWebhook(str(request.url), dict(request.headers), await request.body())
            )
            if self.hang_seconds:
                await asyncio.sleep(self.hang_seconds)
            return Response(status_code=self.statuses.pop(0) if self.statuses else 204)

        return Starlette(routes=[Route("/webhooks/hubspot", hook, methods=["POST"])])

    def events(self) -> list[dict[str, Any]]:
        """Every event received, in order, retries included."""
        return [e for r in self.received for e in r.events()]


@dataclass
class Sandbox:
    """An in-process sandbox with an HTTP client pointed at it."""

    state: SandboxState
    client: httpx.AsyncClient
    receiver: Receiver
    clock: ManualClock

    @property
    def config(self) -> SandboxConfig:
        """The sandbox's live settings."""
        return self.state.config

    async def install(self, portal_id: int = 1001, **kwargs: Any) -> dict[str, Any]:
        """Install the app into a portal; answers the token response."""
        return await install(self.client, self.config, portal_id, **kwargs)

    async def token(self, portal_id: int = 1001, **kwargs: Any) -> dict[str, str]:
        """Bearer headers for a freshly installed portal."""
        tokens = await self.install(portal_id, **kwargs)
        return bearer(tokens["access_token"])

    def deliver_webhooks(self) -> None:
        """Point webhook delivery at the in-process receiver."""
        self.config.webhook_target_url = RECEIVER_URL

    async def webhooks_idle(self) -> None:
        """Wait until every webhook is delivered or given up on."""
        assert self.state.dispatcher is not None
        async with asyncio.timeout(5):
            await self.state.dispatcher.idle()


def bearer(token: str) -> dict[str, str]:
    """Authorization headers for an access token."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox_config(clock: ManualClock) -> SandboxConfig:
    return SandboxConfig(
        clock=clock,
        public_url="http://sandbox.test",
        webhook_batch_delay=0.01,
        webhook_retry_base_delay=0.01,
        webhook_retry_max_delay=0.02,
        webhook_timeout=1.0,
    )


@pytest.fixture
async def sandbox(sandbox_config: SandboxConfig, clock: ManualClock) -> AsyncIterator[Sandbox]:
    receiver = Receiver()
    app = create_sandbox_app(
        sandbox_config, webhook_transport=httpx.ASGITransport(app=receiver.app())
    )
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://sandbox.test"
        ) as client,
    ):
        yield Sandbox(app.state.sandbox, client, receiver, clock)
