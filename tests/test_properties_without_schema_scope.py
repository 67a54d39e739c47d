"""A deployment whose HUBSPOT_SCOPES leave out the schema scopes: told once, the rest syncs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.properties import SCOPE_PROBLEM
from app.settings import Settings
from tests.sync_support import call, drain, post_event
from tests.test_properties import definitions, problems


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        hubspot_scopes="oauth crm.objects.contacts.read crm.objects.contacts.write"
    )


async def test_without_the_schema_scope_the_portal_is_told_and_the_rest_syncs(
    client: Any, install_portal: Any, services: Any, sandbox: Any
) -> None:
    portal = await install_portal(1001)
    await post_event(client, portal, call(campaign_id="spring"))
    await drain(services)

    found = await problems(services, 1001)
    assert SCOPE_PROBLEM in found
    assert "ai_call_summary" not in definitions(sandbox, 1001)  # nothing was created
    [contact] = sandbox.contacts(1001)  # the caller still arrives, with what the portal has
    assert contact.properties["phone"] == "+14155550100"
    assert contact.properties["firstname"] == "Ada"
    assert len(sandbox.calls(1001)) == 1
    # Each property HubSpot said was missing is reported once and then left out.
    assert "property:ai_call_summary" in found
