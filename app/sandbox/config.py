"""The sandbox's configuration: its portals, the app's credentials, and the knobs tests turn."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MARKETING_EVENT_SCOPES = frozenset(
    {"crm.objects.marketing_events.read", "crm.objects.marketing_events.write"}
)

# The scopes a top-tier portal can grant; a tier lacking one drops it from optional_scope.
ALL_SCOPES = frozenset(
    {
        "oauth",
        "crm.objects.contacts.read",
        "crm.objects.contacts.write",
        "crm.schemas.contacts.read",
        "crm.schemas.contacts.write",
        "crm.objects.companies.read",
        "crm.objects.companies.write",
        "crm.objects.deals.read",
        "crm.objects.deals.write",
        "crm.objects.owners.read",
        *MARKETING_EVENT_SCOPES,
    }
)
STARTER_SCOPES = ALL_SCOPES - MARKETING_EVENT_SCOPES

# Scopes an app-level (client credentials) token may carry.
APP_SCOPES = frozenset(
    {
        "developer.webhooks_journal.read",
        "developer.webhooks_journal.subscriptions.read",
        "developer.webhooks_journal.subscriptions.write",
        "developer.webhooks_journal.snapshots.read",
        "developer.webhooks_journal.snapshots.write",
    }
)


@dataclass
class SandboxPortal:
    """One HubSpot account ("portal") the app can be installed into."""

    portal_id: int
    hub_domain: str
    scopes: frozenset[str]  # the scopes this portal's tier can grant
    name: str = ""

    @property
    def display_name(self) -> str:
        """A human name for the UI."""
        return self.name or self.hub_domain.split(".")[0].replace("-", " ").title()


def default_portals() -> list[SandboxPortal]:
    """Two full-featured portals and one starter-tier portal without marketing events."""
    return [
        SandboxPortal(1001, "acme-dental.sandbox.hubspot.test", ALL_SCOPES, "Acme Dental"),
        SandboxPortal(1002, "bright-smiles.sandbox.hubspot.test", ALL_SCOPES, "Bright Smiles"),
        SandboxPortal(1003, "corner-clinic.sandbox.hubspot.test", STARTER_SCOPES, "Corner Clinic"),
    ]


@dataclass
class SandboxConfig:
    """Everything the sandbox needs; most of it can change at runtime (/_sandbox/settings)."""

    client_id: str = "sandbox-client-id"
    client_secret: str = "sandbox-client-secret"  # noqa: S105 - a well-known sandbox credential
    app_id: int = 424242
    portals: list[SandboxPortal] = field(default_factory=default_portals)
    public_url: str = "http://127.0.0.1:8090"
    # None accepts any well-formed redirect URI; HubSpot only accepts those registered on the app.
    redirect_uris: list[str] | None = None
    access_token_lifetime: float = 1800.0
    code_lifetime: float = 600.0
    # HubSpot does not document whether a refresh returns a new refresh token; off keeps it.
    rotate_refresh_tokens: bool = False
    search_lag_seconds: float = 0.0
    latency_seconds: float = 0.0
    requests_per_10s: int | None = 110
    searches_per_second: int | None = 5
    # Whether 429 answers carry Retry-After; HubSpot's behaviour is unconfirmed, so off by default.
    send_retry_after: bool = False
    webhook_target_url: str | None = None
    # The contact properties the app subscribed `contact.propertyChange` to: HubSpot sends
    # changes of those only. The default is what Hubline's README asks for; None: all.
    webhook_properties: list[str] | None = field(
        default_factory=lambda: ["phone", "mobilephone", "email"]
    )
    webhook_batch_delay: float = 0.2
    webhook_timeout: float = 5.0
    # HubSpot retries up to 10 times over about a day; the sandbox compresses the schedule.
    webhook_max_retries: int = 10
    webhook_retry_base_delay: float = 1.0
    webhook_retry_max_delay: float = 60.0
    journal_url_lifetime: float = 300.0
    journal_retention_seconds: float = 3 * 24 * 3600.0
    # HubSpot does not document a downloaded entry's shape: True serves it inside a
    # `journalEvents` list, as some integrations have met it, instead of on its own.
    journal_entries_listed: bool = False
    seed_demo_data: bool = False
    clock: Callable[[], float] = time.time

    def portal(self, portal_id: int) -> SandboxPortal | None:
        """The configured portal with this id, if any."""
        return next((p for p in self.portals if p.portal_id == portal_id), None)
