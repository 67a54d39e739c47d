"""Provisioning Hubline's contact properties: create, leave alone, repair, report, re-run daily."""

from __future__ import annotations

import unicodedata
from typing import Any

import sqlalchemy as sa

from app.models import EventStatus, InboxEvent, PortalProblem
from app.properties import (
    PROVISION_EVENT,
    SPECS,
    STRING,
    compatible_use,
    provision,
    provision_all_daily,
    register_periodic,
    request_provisioning,
    snake_case,
)
from app.sandbox.schemas import create_property
from app.worker import Worker
from tests.sync_support import call, drain, post_event

EXPECTED = {
    "ai_call_summary": ("string", "textarea"),
    "call_outcome": ("enumeration", "select"),
    "lead_source": ("enumeration", "select"),
    "ai_lead_score": ("number", "number"),
    "follow_up_required": ("bool", "booleancheckbox"),
    "appointment_booked": ("bool", "booleancheckbox"),
    "marketing_campaign_id": ("string", "text"),
    "sync_error_message": ("string", "textarea"),
}


def definitions(sandbox: Any, portal_id: int) -> dict[str, Any]:
    return sandbox.portal(portal_id).properties["contacts"]


async def problems(services: Any, portal_id: int) -> dict[str, str]:
    async with services.sessions() as session:
        rows = await session.execute(
            sa.select(PortalProblem.code, PortalProblem.message).where(
                PortalProblem.portal_id == portal_id
            )
        )
        return {row[0]: row[1] for row in rows}


async def test_install_creates_the_group_and_every_property(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    await drain(services)

    defs = definitions(sandbox, 1001)
    for name, (type_, field_type) in EXPECTED.items():
        assert (defs[name].type, defs[name].field_type, defs[name].group_name) == (
            type_,
            field_type,
            "ai_receptionist",
        )
    assert "ai_receptionist" in sandbox.portal(1001).groups["contacts"]
    assert defs["call_outcome"].option_values() == [
        "appointment_booked",
        "message_taken",
        "question_answered",
        "transferred",
        "spam",
        "other",
    ]
    [lead_source] = defs["lead_source"].options
    assert (lead_source["value"], lead_source["label"]) == ("ai_receptionist", "AI Receptionist")
    assert await problems(services, 1001) == {}


def test_yes_no_properties_are_created_with_hubspots_checkbox_options() -> None:
    for spec in SPECS:
        if spec.type == "bool":
            options = spec.definition("AI Receptionist")["options"]
            assert [(o["value"], o["label"]) for o in options] == [("true", "Yes"), ("false", "No")]


async def test_existing_properties_are_left_alone_and_incompatible_ones_reported(
    client: Any, install_portal: Any, services: Any, sandbox: Any
) -> None:
    world = sandbox.portal(1001)
    now = sandbox.now()
    create_property(
        world,
        "contacts",
        {
            "name": "lead_source",
            "label": "Where they came from",
            "type": "enumeration",
            "fieldType": "radio",
            "groupName": "contactinformation",
            "options": [{"label": "Website", "value": "website"}],
        },
        now,
    )
    create_property(
        world,
        "contacts",
        {
            "name": "ai_lead_score",
            "label": "Temperature",
            "type": "enumeration",
            "fieldType": "select",
            "groupName": "contactinformation",
            "options": [{"label": "Hot", "value": "hot"}, {"label": "Cold", "value": "cold"}],
        },
        now,
    )
    portal = await install_portal(1001)
    await drain(services)

    defs = definitions(sandbox, 1001)
    assert defs["lead_source"].label == "Where they came from"
    assert defs["lead_source"].field_type == "radio"
    assert defs["lead_source"].option_values() == ["website", "ai_receptionist"]
    assert defs["ai_lead_score"].option_values() == ["hot", "cold"]  # untouched
    found = await problems(services, 1001)
    assert set(found) == {"property:ai_lead_score"}
    assert "ai_lead_score" in found["property:ai_lead_score"]

    # The rest still syncs; the incompatible property is left out of every write.
    await post_event(client, portal, call(lead_score=99))
    await drain(services)
    [contact] = sandbox.contacts(1001)
    assert contact.properties["ai_call_summary"]
    assert contact.properties["lead_source"] == "ai_receptionist"
    assert "ai_lead_score" not in contact.properties
    async with services.sessions() as session:
        statuses = set((await session.execute(sa.select(InboxEvent.status))).scalars())
    assert statuses == {EventStatus.done}


async def test_a_deleted_property_is_recreated_by_the_next_run(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    await drain(services)
    del definitions(sandbox, 1001)["sync_error_message"]
    before = dict(definitions(sandbox, 1001)["call_outcome"].__dict__)

    state = await provision(services, 1001)

    assert "sync_error_message" in definitions(sandbox, 1001)
    assert "sync_error_message" in state.usable
    assert definitions(sandbox, 1001)["call_outcome"].__dict__ == before  # left as it was


async def test_the_daily_run_queues_one_provisioning_per_active_portal(
    install_portal: Any, services: Any, sandbox: Any
) -> None:
    await install_portal(1001)
    await install_portal(1002)
    await drain(services)
    worker = Worker(services)
    register_periodic(worker)
    assert "properties-daily" in [job.name for job in worker._periodic]

    assert await provision_all_daily(services) == 2
    assert await provision_all_daily(services) == 0  # once a day
    assert await request_provisioning(services, 1001, key="manual:1") is True
    async with services.sessions() as session:
        pending = (
            await session.execute(
                sa.select(sa.func.count()).where(
                    InboxEvent.type == PROVISION_EVENT, InboxEvent.status == EventStatus.pending
                )
            )
        ).scalar_one()
    assert pending == 3
    await drain(services)


def test_compatibility_rules() -> None:
    from app.properties import SPEC_BY_NAME

    summary, outcome, booked = (
        SPEC_BY_NAME[n] for n in ("ai_call_summary", "call_outcome", "appointment_booked")
    )
    assert compatible_use(summary, {"type": "string", "fieldType": "html"}) is not None
    assert compatible_use(summary, {"type": "number", "fieldType": "number"}) is None
    text_outcome = compatible_use(outcome, {"type": "string", "fieldType": "text"})
    assert text_outcome is not None
    assert text_outcome.kind == STRING
    assert compatible_use(outcome, {"type": "enumeration", "fieldType": "booleancheckbox"}) is None
    yes_no = {
        "type": "enumeration",
        "fieldType": "booleancheckbox",
        "options": [{"value": "true"}, {"value": "false"}],
    }
    assert compatible_use(booked, yes_no) is not None
    assert compatible_use(booked, {"type": "string", "fieldType": "text"}) is None
    assert snake_case("Left a Voicemail!") == "left_a_voicemail"
    assert snake_case("  ") == "other"


def test_outcome_values_fold_accents_and_keep_other_scripts_apart() -> None:
    assert snake_case("Réservé à l'avance") == "reserve_a_l_avance"
    assert snake_case("Straße") == "strasse"
    voicemail, callback = snake_case("留守番電話"), snake_case("折り返し電話")
    assert voicemail.startswith("outcome_")
    assert callback.startswith("outcome_")
    assert voicemail != callback
    assert snake_case(" 留守番電話 ") == voicemail  # stable
    # Whatever survives folding, labels that lost letters to it stay apart.
    assert snake_case("Перезвонить 2") != snake_case("Отмена 2")
    assert snake_case(unicodedata.normalize("NFD", "ガイド")) == snake_case("ガイド")


def test_an_outcome_of_signs_alone_gets_a_value_of_its_own() -> None:
    """It got "", which HubSpot reads as clearing the contact's outcome."""
    values = {label: snake_case(label) for label in ("???", "!!!", "😀", "—")}
    assert all(value.startswith("outcome_") for value in values.values())
    assert len(set(values.values())) == len(values)
