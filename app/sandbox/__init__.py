"""A faithful, in-memory local HubSpot for development, demos and tests.

It emulates what Hubline touches: OAuth (authorize page, token endpoints, introspect,
revoke, app uninstall), contacts, calls and notes (records, batches, search with lag),
properties, marketing events, rate limits, injected faults, signed webhooks with retries,
and the webhooks journal. A small UI shows portals, contacts, timelines and API traffic;
`/_sandbox/...` endpoints inspect and control it.
"""

from app.sandbox.app import create_sandbox_app, serve_sandbox
from app.sandbox.config import SandboxConfig, SandboxPortal
from app.sandbox.state import SandboxState
from app.sandbox.testing import ManualClock
from app.sandbox.webhooks import signature_v1, signature_v3

__all__ = [
    "ManualClock",
    "SandboxConfig",
    "SandboxPortal",
    "SandboxState",
    "create_sandbox_app",
    "serve_sandbox",
    "signature_v1",
    "signature_v3",
]
