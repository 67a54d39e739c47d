"""A portal that lets Hubline read its contact properties but not create them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.properties import SCHEMA_WRITE_SCOPE, request_provisioning
from app.sandbox.schemas import create_property
from app.settings import Settings
from tests.sync_support import call, drain, post_event
from tests.test_properties import problems


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        hubspot_scopes="oauth crm.objects.contacts.read crm.objects.contacts.write "
        "crm.schemas.contacts.read"
    )


async def test_a_deleted_call_outcome_is_not_recreated_without_the_write_scope(
    client: Any, install_portal: Any, services: Any, sandbox: Any
) -> None:
    portal = await install_portal(1001)
    world = sandbox.portal(1001)
    # An admin made the property; Hubline found it and writes to it.
    create_property(
        world,
        "contacts",
        {
            "name": "call_outcome",
            "label": "Call outcome",
            "type": "enumeration",
            "fieldType": "select",
            "groupName": "contactinformation",
            "options": [{"label": "Other", "value": "other"}],
        },
        sandbox.now(),
    )
    await request_provisioning(services, 1001, key="manual:test")
    await drain(services)
    del world.properties["contacts"]["call_outcome"]

    await post_event(client, portal, call(outcome="Left a voicemail"))
    await drain(services)
    creates = sum(
        n
        for (_, endpoint, _), n in sandbox.request_counts.items()
        if endpoint.startswith("POST /crm/v3/properties")
    )
    assert creates == 0, "no group or property create it may not make"
    [contact] = sandbox.contacts(1001)  # the caller still arrives
    assert "call_outcome" not in contact.properties
    found = await problems(services, 1001)
    assert SCHEMA_WRITE_SCOPE in found["property:call_outcome"]
