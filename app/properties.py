"""Hubline's contact properties in each portal: provisioning, compatibility and dropdown options.

The `properties.provision` job (queued at install, re-run daily and on demand) creates the
`ai_receptionist` group and the contact properties of DESIGN.md that are missing, leaves
existing ones as they are and recreates deleted ones; a write that finds one of them
deleted since (HubSpot says it does not exist) creates it again at once and is sent again,
so its values are not lost. A property Hubline cannot use — an existing one of the same
name with an incompatible type, or one it may not create because the portal did not
grant the schema scope — becomes a visible portal problem naming it, and is left out of
every write; everything else still syncs.

What the last run found is kept per portal in `app_state` (`crm_properties:<portal id>`):
how each property is written and the dropdown options known to exist, so the sync handler
needs no request to know what it may write. A `call_outcome` Hubline has not seen before
is added as a new option (value = its label in snake_case) before it is written; where
HubSpot refuses that (no schema write scope) the outcome is left out and the portal told
once. An option an admin removed (a call outcome, or `lead_source`'s `ai_receptionist`)
is added back when a write is refused for it, or, if it cannot be, left out and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.db import transaction
from app.errors import HubSpotAuthError, HubSpotConflict, HubSpotError, HubSpotValidationError
from app.hubspot import HubSpotClient, hubspot_client
from app.inbox import Done, EventView, HandlerContext, NewEvent, Outcome, enqueue, registry
from app.lifecycle import PROVISION_EVENT
from app.models import AppState, EventSource, Portal, PortalStatus, utcnow
from app.portals import clear_problem, record_problem

if TYPE_CHECKING:
    from app.main import Services
    from app.worker import Worker

log = logging.getLogger(__name__)

GROUP_NAME = "ai_receptionist"
GROUP_LABEL = "AI receptionist"
PROPERTIES_PATH = "/crm/v3/properties/contacts"
SCHEMA_READ_SCOPES = frozenset({"crm.schemas.contacts.read", "crm.schemas.contacts.write"})
SCHEMA_WRITE_SCOPE = "crm.schemas.contacts.write"
SCOPE_PROBLEM = "properties:schema_scope"
# New call outcomes cannot be added as options (the schema write scope is missing).
OPTIONS_SCOPE_PROBLEM = "properties:options_scope"
STATE_PREFIX = "crm_properties:"
DAILY_SECONDS = 24 * 3600.0

LEAD_SOURCE_VALUE = "ai_receptionist"
OUTCOME_OPTIONS = (
    ("appointment_booked", "Appointment booked"),
    ("message_taken", "Message taken"),
    ("question_answered", "Question answered"),
    ("transferred", "Transferred"),
    ("spam", "Spam"),
    ("other", "Other"),
)

YES_NO_OPTIONS = (("true", "Yes"), ("false", "No"))

# How Hubline writes a property, decided by the type of the property the portal has.
STRING = "string"  # free text
NUMBER = "number"
BOOL = "bool"  # "true" / "false" (type bool, or an enumeration shown as a checkbox)
OPTION = "option"  # an enumeration: one of its option values


@dataclass(frozen=True)
class PropertySpec:
    """One contact property Hubline owns, as it creates it."""

    name: str
    label: str
    type: str
    field_type: str
    description: str
    kind: str  # how values are written when the property is Hubline's own

    def definition(self, lead_source_label: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "type": self.type,
            "fieldType": self.field_type,
            "groupName": GROUP_NAME,
            "description": self.description,
        }
        options = default_options(self.name, lead_source_label)
        if self.type == "bool":
            # The options HubSpot's own checkboxes carry: its documentation does not say
            # whether a bool property created without them is taken, and if it were
            # refused, the batch would create none of Hubline's properties.
            options = YES_NO_OPTIONS
        if options:
            body["options"] = [
                {"label": label, "value": value, "displayOrder": i, "hidden": False}
                for i, (value, label) in enumerate(options)
            ]
        return body


SPECS = (
    PropertySpec(
        "ai_call_summary", "AI call summary", "string", "textarea",
        "What the AI receptionist's last conversation with this contact was about.", STRING,
    ),
    PropertySpec(
        "call_outcome", "Call outcome", "enumeration", "select",
        "How the AI receptionist's last conversation with this contact ended.", OPTION,
    ),
    PropertySpec(
        "lead_source", "Lead source", "enumeration", "select",
        "Where this contact came from.", OPTION,
    ),
    PropertySpec(
        "ai_lead_score", "AI lead score", "number", "number",
        "The AI receptionist's lead score for this contact's last conversation.", NUMBER,
    ),
    PropertySpec(
        "follow_up_required", "Follow-up required", "bool", "booleancheckbox",
        "Whether the AI receptionist said this contact needs a follow-up.", BOOL,
    ),
    PropertySpec(
        "appointment_booked", "Appointment booked", "bool", "booleancheckbox",
        "Whether the AI receptionist booked an appointment in the last conversation.", BOOL,
    ),
    PropertySpec(
        "marketing_campaign_id", "Marketing campaign ID", "string", "text",
        "The campaign that brought this contact to the AI receptionist.", STRING,
    ),
    PropertySpec(
        "sync_error_message", "Sync error message", "string", "textarea",
        "Why Hubline could not sync the last receptionist event of this contact (empty: fine).",
        STRING,
    ),
)  # fmt: skip
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
PROPERTY_NAMES = frozenset(SPEC_BY_NAME)


def default_options(name: str, lead_source_label: str) -> tuple[tuple[str, str], ...]:
    """(value, label) options Hubline creates a dropdown with."""
    if name == "call_outcome":
        return OUTCOME_OPTIONS
    if name == "lead_source":
        return ((LEAD_SOURCE_VALUE, lead_source_label),)
    return ()


def snake_case(label: str) -> str:
    """An option value from a label: "Left a Voicemail" → "left_a_voicemail"."""
    text = unicodedata.normalize("NFKC", label.strip()).casefold()
    if not text:
        return "other"
    # Accents folded: "Réservé" → "reserve".
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    value = re.sub(r"[^0-9a-z]+", "_", plain).strip("_")[:100].rstrip("_")
    if not value or any(char.isalnum() and not char.isascii() for char in plain):
        # Letters of other alphabets ("留守番電話", "Перезвонить 2") cannot be in a value,
        # and a label of signs alone ("???", "😀") leaves none (HubSpot reads an empty
        # value as "clear the property"): a digest of the label keeps such outcomes apart,
        # and the option's label shows them.
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        value = f"{value[:80].rstrip('_')}_{digest}" if value else f"outcome_{digest}"
    return value


def outcome_value(label: str, existing: Collection[str]) -> str:
    """The option value of an outcome, or the one earlier versions made where the portal has it."""
    value = snake_case(label)
    # Before accents were folded, "Réservé" became "r_serv": a portal that has that option
    # keeps getting it rather than a second option with the same label.
    earlier = re.sub(r"[^0-9a-z]+", "_", label.strip().lower()).strip("_")[:100]
    if value not in existing and earlier not in ("", "other") and earlier in existing:
        return earlier
    return value


def problem_code(name: str) -> str:
    return f"property:{name}"


# --- what a portal has -------------------------------------------------------------------


@dataclass
class PropertyUse:
    """How Hubline writes one property in one portal."""

    kind: str
    options: list[str] = field(default_factory=list)  # option values, for OPTION

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "options": self.options}


@dataclass
class PortalProperties:
    """What provisioning found in a portal: usable properties and why the others are not."""

    usable: dict[str, PropertyUse] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)
    # False when the portal could not be inspected (no schema scope): every property is
    # then tried, and one HubSpot says does not exist is dropped when a write names it.
    inspected: bool = True

    @classmethod
    def assumed(cls) -> PortalProperties:
        """Hubline's own definitions, for a portal whose properties cannot be read."""
        return cls(
            usable={spec.name: _default_use(spec, "") for spec in SPECS},
            inspected=False,
        )

    def use(self, name: str) -> PropertyUse | None:
        return self.usable.get(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "usable": {name: use.to_json() for name, use in self.usable.items()},
                "unusable": self.unusable,
                "inspected": self.inspected,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PortalProperties:
        data = json.loads(text)
        return cls(
            usable={
                name: PropertyUse(str(use["kind"]), [str(o) for o in use.get("options") or []])
                for name, use in (data.get("usable") or {}).items()
            },
            unusable={str(k): str(v) for k, v in (data.get("unusable") or {}).items()},
            inspected=bool(data.get("inspected", True)),
        )


def state_key(portal_id: int) -> str:
    return f"{STATE_PREFIX}{portal_id}"


async def load_state(portal_id: int, *, session: AsyncSession) -> PortalProperties | None:
    """What the last provisioning run found, or None when it never ran."""
    row = await session.get(AppState, state_key(portal_id))
    return PortalProperties.from_json(row.value) if row is not None else None


async def save_state(portal_id: int, state: PortalProperties, *, session: AsyncSession) -> None:
    row = await session.get(AppState, state_key(portal_id))
    if row is None:
        session.add(AppState(name=state_key(portal_id), value=state.to_json()))
    else:
        row.value = state.to_json()
        row.updated_at = utcnow()
    await session.flush()


def compatible_use(spec: PropertySpec, found: dict[str, Any]) -> PropertyUse | None:
    """How Hubline can write into an existing property of this name, or None if it cannot."""
    type_ = str(found.get("type") or "")
    field_type = str(found.get("fieldType") or "")
    options = [str(o.get("value")) for o in found.get("options") or [] if isinstance(o, dict)]
    if spec.kind == STRING:
        return PropertyUse(STRING) if type_ == "string" else None
    if spec.kind == NUMBER:
        return PropertyUse(NUMBER) if type_ == "number" else None
    if spec.kind == BOOL:
        if type_ == "bool":
            return PropertyUse(BOOL)
        if type_ == "enumeration" and {"true", "false"} <= set(options):
            return PropertyUse(BOOL)
        return None
    # A dropdown: an enumeration that is not a yes/no checkbox, or plain text (its label).
    if type_ == "enumeration" and field_type != "booleancheckbox":
        return PropertyUse(OPTION, options)
    if type_ == "string":
        return PropertyUse(STRING)
    return None


def _describe(found: dict[str, Any]) -> str:
    return f"{found.get('type')}/{found.get('fieldType')}"


# --- provisioning --------------------------------------------------------------------------


@dataclass
class _Findings:
    state: PortalProperties = field(default_factory=PortalProperties)
    problems: dict[str, str] = field(default_factory=dict)
    fine: set[str] = field(default_factory=set)  # problem codes to clear


async def provision(services: Services, portal_id: int) -> PortalProperties:
    """Make the portal's properties what Hubline needs, as far as it may; record the outcome."""
    async with services.sessions() as session:
        portal = await session.get(Portal, portal_id)
        scopes = portal.scope_set if portal is not None else frozenset()
    client = hubspot_client(services, portal_id)
    label = services.settings.lead_source_label
    findings = _Findings()
    if not scopes & SCHEMA_READ_SCOPES:
        findings.state = PortalProperties.assumed()
        findings.problems[SCOPE_PROBLEM] = (
            "Hubline cannot check or create its contact properties: the portal did not grant "
            f"{SCHEMA_WRITE_SCOPE}. Values are still written to properties that exist."
        )
    else:
        try:
            await _provision(client, scopes, label, findings)
        except HubSpotAuthError as error:
            if error.status_code != 403:
                raise
            findings.state = PortalProperties.assumed()
            findings.problems[SCOPE_PROBLEM] = (
                "HubSpot refused to show or create Hubline's contact properties "
                f"(missing scope); grant {SCHEMA_WRITE_SCOPE} by installing again."
            )
    async with transaction(services.sessions) as session:
        await save_state(portal_id, findings.state, session=session)
        for code, message in findings.problems.items():
            await record_problem(portal_id, code, message, session=session)
        for code in findings.fine - set(findings.problems):
            await clear_problem(portal_id, code, session=session)
    for code in findings.problems:
        log.warning("property problem: %s", code, extra={"portal_id": portal_id})
    return findings.state


async def _provision(
    client: HubSpotClient, scopes: frozenset[str], label: str, findings: _Findings
) -> None:
    state = findings.state
    can_write = SCHEMA_WRITE_SCOPE in scopes
    answer = await client.get_json(PROPERTIES_PATH, {"archived": "false"})
    existing = {
        str(item.get("name")): item
        for item in (answer or {}).get("results") or []
        if isinstance(item, dict)
    }
    missing: list[PropertySpec] = []
    for spec in SPECS:
        code = problem_code(spec.name)
        found = existing.get(spec.name)
        if found is None:
            missing.append(spec)
            continue
        use = compatible_use(spec, found)
        if use is None:
            reason = (
                f"The portal already has a contact property named {spec.name!r} of type "
                f"{_describe(found)}; Hubline needs {spec.type}/{spec.field_type} and leaves "
                "it alone (its value is not synced). Rename or delete it, then reconnect."
            )
            state.unusable[spec.name] = reason
            findings.problems[code] = reason
            continue
        state.usable[spec.name] = use
        findings.fine.add(code)
    if missing and not can_write:
        for spec in missing:
            reason = (
                f"The contact property {spec.name!r} is missing and Hubline may not create it "
                f"without the {SCHEMA_WRITE_SCOPE} scope."
            )
            state.unusable[spec.name] = reason
            findings.problems[problem_code(spec.name)] = reason
    elif missing:
        made = await _create(client, missing, label)
        for spec in missing:
            if spec.name in made:
                state.usable[spec.name] = _default_use(spec, label)
                findings.fine.add(problem_code(spec.name))
            else:
                # Created by someone else meanwhile (or refused): the next run looks again.
                reason = f"Hubline could not create the contact property {spec.name!r}."
                state.unusable[spec.name] = reason
                findings.problems[problem_code(spec.name)] = reason
        log.info("created %d contact properties", len(made), extra={"portal_id": client.portal_id})
    if can_write or not missing:
        findings.fine.add(SCOPE_PROBLEM)
    if can_write:
        findings.fine.add(OPTIONS_SCOPE_PROBLEM)
    lead_source = state.usable.get("lead_source")
    if lead_source is not None and lead_source.kind == OPTION:
        if LEAD_SOURCE_VALUE not in lead_source.options and can_write:
            # Without this option the value Hubline fills in would be refused.
            await add_options(client, "lead_source", {LEAD_SOURCE_VALUE: label}, lead_source)
        if LEAD_SOURCE_VALUE not in lead_source.options:
            del state.usable["lead_source"]
            reason = (
                f"The contact property 'lead_source' has no option {LEAD_SOURCE_VALUE!r} and "
                "Hubline may not add it."
            )
            state.unusable["lead_source"] = reason
            findings.problems[problem_code("lead_source")] = reason


async def recreate(
    services: Services, client: HubSpotClient, state: PortalProperties, names: set[str]
) -> set[str]:
    """Create again Hubline's properties a write found missing (deleted since the last check).

    Answers the names HubSpot created, now usable with their default options; for the
    others (refused, or made by someone else meanwhile) the caller does as before.
    """
    specs = [SPEC_BY_NAME[name] for name in sorted(names)]
    label = services.settings.lead_source_label
    try:
        made = names & await _create(client, specs, label)
    except (HubSpotValidationError, HubSpotConflict, HubSpotAuthError) as error:
        if isinstance(error, HubSpotAuthError) and error.status_code != 403:
            raise
        log.warning(
            "recreating deleted contact properties failed (%s)",
            error.category or error.status_code,
            extra={"portal_id": client.portal_id, "correlation_id": error.correlation_id},
        )
        return set()
    if not made:
        return made
    for spec in specs:
        if spec.name in made:
            state.usable[spec.name] = _default_use(spec, label)
            state.unusable.pop(spec.name, None)
    async with transaction(services.sessions) as session:
        await save_state(client.portal_id, state, session=session)
        for name in made:
            await clear_problem(client.portal_id, problem_code(name), session=session)
    log.info(
        "recreated %d deleted contact properties: %s",
        len(made),
        ", ".join(sorted(made)),
        extra={"portal_id": client.portal_id},
    )
    return made


async def _create(client: HubSpotClient, specs: list[PropertySpec], label: str) -> set[str]:
    """Create the properties (and their group); answers the names HubSpot created."""
    await _ensure_group(client)
    created = await client.post_json(
        f"{PROPERTIES_PATH}/batch/create", {"inputs": [spec.definition(label) for spec in specs]}
    )
    results = (created or {}).get("results") or []
    return {str(item.get("name")) for item in results if isinstance(item, dict)}


def _default_use(spec: PropertySpec, lead_source_label: str) -> PropertyUse:
    """How Hubline writes a property as it creates it."""
    return PropertyUse(
        spec.kind, [value for value, _ in default_options(spec.name, lead_source_label)]
    )


async def _ensure_group(client: HubSpotClient) -> None:
    with contextlib.suppress(HubSpotConflict):  # it exists
        await client.post_json(
            f"{PROPERTIES_PATH}/groups", {"name": GROUP_NAME, "label": GROUP_LABEL}
        )


async def add_options(
    client: HubSpotClient, name: str, wanted: dict[str, str], use: PropertyUse
) -> None:
    """Add dropdown options (value → label) the property lacks; updates `use.options`."""
    current = await client.get_json(f"{PROPERTIES_PATH}/{name}")
    options = [o for o in (current or {}).get("options") or [] if isinstance(o, dict)]
    present = {str(o.get("value")) for o in options}
    new = {value: label for value, label in wanted.items() if value not in present}
    if new:
        order = max((int(o.get("displayOrder", 0) or 0) for o in options), default=-1) + 1
        options += [
            {"label": label, "value": value, "displayOrder": order + i, "hidden": False}
            for i, (value, label) in enumerate(new.items())
        ]
        await client.patch_json(f"{PROPERTIES_PATH}/{name}", {"options": options})
        log.info("added %d %s options", len(new), name, extra={"portal_id": client.portal_id})
    use.options = [str(o.get("value")) for o in options]


async def ensure_outcome_options(
    services: Services,
    client: HubSpotClient,
    state: PortalProperties,
    labels: list[str],
    *,
    problems: set[str],
    scopes: frozenset[str],
) -> set[str]:
    """Make every outcome (by label) an option of `call_outcome`; answers the usable values.

    An outcome that cannot be added is left out of the writes (the other values still
    sync); a missing scope is said once on the portal (`problems`: the codes it has).
    """
    use = state.use("call_outcome")
    if use is None or use.kind != OPTION:
        return set()
    wanted: dict[str, str] = {}
    for label in labels:
        # Labels that differ only in case or accents are one option, labelled as first seen.
        wanted.setdefault(outcome_value(label, use.options), label)
    if set(wanted) - set(use.options):
        try:
            may_create = SCHEMA_WRITE_SCOPE in scopes
            if not await _add_outcome_options(services, client, state, wanted, use, may_create):
                problems.add(problem_code("call_outcome"))
                return set()
        except HubSpotAuthError as error:
            if error.status_code != 403:
                raise
            if OPTIONS_SCOPE_PROBLEM not in problems:
                async with transaction(services.sessions) as session:
                    await record_problem(
                        client.portal_id,
                        OPTIONS_SCOPE_PROBLEM,
                        "Call outcomes the AI receptionist has not used before are not saved "
                        "on contacts: HubSpot refused to add them as options of "
                        f"'call_outcome' (missing scope {SCHEMA_WRITE_SCOPE}); install "
                        "Hubline again to grant it.",
                        session=session,
                    )
                problems.add(OPTIONS_SCOPE_PROBLEM)
                log.warning(
                    "property problem: %s",
                    OPTIONS_SCOPE_PROBLEM,
                    extra={"portal_id": client.portal_id},
                )
        except HubSpotValidationError as error:
            # HubSpot's message can echo the labels (callers' words): log the category only.
            log.warning(
                "adding call_outcome options failed (%s)",
                error.category,
                extra={"portal_id": client.portal_id, "correlation_id": error.correlation_id},
            )
        async with transaction(services.sessions) as session:
            await save_state(client.portal_id, state, session=session)
    # From the state, not `use`: a recreated property replaced it there before a refusal.
    current = state.use("call_outcome")
    return set(wanted) & set(current.options) if current is not None else set()


async def _add_outcome_options(
    services: Services,
    client: HubSpotClient,
    state: PortalProperties,
    wanted: dict[str, str],
    use: PropertyUse,
    may_create: bool,
) -> bool:
    """`add_options` for `call_outcome`, recreating it if deleted; False if it cannot be."""
    try:
        await add_options(client, "call_outcome", wanted, use)
        return True
    except HubSpotError as error:
        if error.status_code != 404:
            raise
    if not may_create or "call_outcome" not in await recreate(
        services, client, state, {"call_outcome"}
    ):
        why = (
            "could not create it again"
            if may_create
            else f"may not create it again without the {SCHEMA_WRITE_SCOPE} scope"
        )
        await mark_unusable(
            services,
            client.portal_id,
            state,
            "call_outcome",
            f"HubSpot says the contact property 'call_outcome' does not exist and Hubline "
            f"{why}; it is left out until the next property check.",
        )
        return False
    await add_options(client, "call_outcome", wanted, state.usable["call_outcome"])
    return True


async def ensure_lead_source_option(
    services: Services, client: HubSpotClient, state: PortalProperties, problems: set[str]
) -> bool:
    """Add back the `lead_source` option Hubline writes (an admin removed it); False, with
    `lead_source` left out of the writes and the reason on the portal, when it cannot be."""
    use = state.use("lead_source")
    if use is None or use.kind != OPTION:
        return False
    label = services.settings.lead_source_label
    try:
        await add_options(client, "lead_source", {LEAD_SOURCE_VALUE: label}, use)
    except HubSpotError as error:
        refused = (
            isinstance(error, HubSpotValidationError)
            or error.status_code == 404
            or (isinstance(error, HubSpotAuthError) and error.status_code == 403)
        )
        if not refused:
            raise
        await mark_unusable(
            services,
            client.portal_id,
            state,
            "lead_source",
            f"The contact property 'lead_source' has no option {LEAD_SOURCE_VALUE!r} and "
            "HubSpot refused to add it back; new callers are synced without a lead source.",
        )
        problems.add(problem_code("lead_source"))
        return False
    async with transaction(services.sessions) as session:
        await save_state(client.portal_id, state, session=session)
    return LEAD_SOURCE_VALUE in use.options


async def recheck_type(
    services: Services, client: HubSpotClient, state: PortalProperties, name: str
) -> bool:
    """HubSpot refused a value Hubline built for its own property: read the property again.

    Answers True when it has been changed to a type Hubline cannot write (then it is left
    out and reported on the portal, as the property check would find it); False when it
    can still be written, so the refusal was the record's own.
    """
    spec = SPEC_BY_NAME[name]
    found = await client.get_json(f"{PROPERTIES_PATH}/{name}")
    use = compatible_use(spec, found) if isinstance(found, dict) else None
    if use is not None:
        state.usable[name] = use
        return False
    described = _describe(found) if isinstance(found, dict) else "unreadable"
    await mark_unusable(
        services,
        client.portal_id,
        state,
        name,
        f"The contact property {name!r} was changed to {described}; Hubline needs "
        f"{spec.type}/{spec.field_type} and leaves it out (its value is not synced). "
        "Change it back, or delete it for Hubline to make it again.",
    )
    return True


async def mark_unusable(
    services: Services, portal_id: int, state: PortalProperties, name: str, reason: str
) -> None:
    """HubSpot refused a write naming this property: stop writing it and say so on the portal."""
    state.usable.pop(name, None)
    state.unusable[name] = reason
    async with transaction(services.sessions) as session:
        await save_state(portal_id, state, session=session)
        await record_problem(portal_id, problem_code(name), reason, session=session)
    log.warning("property %s is unusable; left out of writes", name, extra={"portal_id": portal_id})


# --- the job --------------------------------------------------------------------------------


@registry.handler(PROVISION_EVENT, batch_size=100)
async def handle_provision(ctx: HandlerContext, events: list[EventView]) -> dict[int, Outcome]:
    """One provisioning run answers every provisioning request of the portal that is due."""
    state = await provision(ctx.services, ctx.portal_id)
    result = {"usable": sorted(state.usable), "unusable": sorted(state.unusable)}
    return {event.id: Done(result=result) for event in events}


async def request_provisioning(services: Services, portal_id: int, *, key: str) -> bool:
    """Queue a provisioning run for the portal; False when one with this key was queued."""
    now = utcnow()
    async with transaction(services.sessions) as session:
        enqueued = await enqueue(
            NewEvent(
                portal_id=portal_id,
                source=EventSource.internal,
                type=PROVISION_EVENT,
                idempotency_key=f"{PROVISION_EVENT}:{key}",
                occurred_at=now,
                payload={"reason": key.split(":", 1)[0]},
            ),
            session=session,
            cipher=services.cipher,
        )
    return enqueued.created


async def provision_all_daily(services: Services) -> int:
    """Queue today's provisioning run for every active portal; returns how many were queued."""
    async with services.sessions() as session:
        portals = list(
            (
                await session.execute(
                    sa.select(col(Portal.portal_id)).where(
                        col(Portal.status) == PortalStatus.active
                    )
                )
            ).scalars()
        )
    today = date.today().isoformat()
    queued = 0
    for portal_id in portals:
        queued += await request_provisioning(services, portal_id, key=f"daily:{today}")
    if queued:
        log.info("queued the daily property check for %d portals", queued)
    return queued


def register_periodic(worker: Worker) -> None:
    """Re-run provisioning daily, so deleted properties come back and problems clear."""

    async def daily(services: Services) -> None:
        await provision_all_daily(services)

    worker.add_periodic("properties-daily", DAILY_SECONDS, daily)
