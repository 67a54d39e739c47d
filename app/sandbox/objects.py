"""CRM record operations shared by the API and the UI: validate, write, merge, delete, emit events.

Writes validate everything first and change nothing on error, so a batch can validate all
inputs and then commit them, failing whole as HubSpot does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.sandbox.errors import conflict, not_found, property_errors, validation_error
from app.sandbox.properties import (
    CALCULATED_PHONES,
    DEFAULT_READ_PROPERTIES,
    calculated_phone,
    error_message,
    iso,
    normalize_value,
)
from app.sandbox.state import (
    ASSOCIATION_LABELS,
    ASSOCIATION_TYPES,
    UI_SOURCE,
    ChangeSource,
    CrmObject,
    PortalWorld,
    SandboxState,
)

SYSTEM_PROPERTIES = {
    "contacts": ("createdate", "lastmodifieddate", "hs_object_id"),
    "calls": ("hs_createdate", "hs_lastmodifieddate", "hs_object_id"),
    "notes": ("hs_createdate", "hs_lastmodifieddate", "hs_object_id"),
}
REQUIRED_ON_CREATE = {"calls": ("hs_timestamp",), "notes": ("hs_timestamp",)}


@dataclass
class PreparedCreate:
    """A validated create, ready to commit."""

    properties: dict[str, str]
    associations: list[tuple[str, str]]  # (to_type, to_id)


def prepare_properties(
    world: PortalWorld, object_type: str, raw: object, *, creating: bool
) -> dict[str, str]:
    """Validate written property values; answer them normalized (400 listing every problem)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise validation_error("properties must be a JSON object")
    defs = world.properties[object_type]
    problems: list[dict[str, str]] = []
    values: dict[str, str] = {}
    for name, value in raw.items():
        prop = defs.get(name)
        code: str | None
        if prop is None:
            code = "PROPERTY_DOESNT_EXIST"
        elif prop.read_only_value:
            code = "READ_ONLY_VALUE"
        else:
            values[name], code = normalize_value(prop, value)
        if code is not None:
            problems.append(
                {"name": name, "error": code, "message": error_message(name, code, value, prop)}
            )
    if creating:
        for name in REQUIRED_ON_CREATE.get(object_type, ()):
            if not values.get(name):
                problems.append(
                    {"name": name, "error": "REQUIRED_FIELD", "message": f"{name} is required"}
                )
    if problems:
        raise property_errors(problems)
    return values


def check_unique(
    world: PortalWorld,
    object_type: str,
    values: dict[str, str],
    *,
    exclude_id: str | None = None,
) -> None:
    """409 when a value of email or a unique property already belongs to another record."""
    if object_type == "contacts" and values.get("email"):
        existing = world.find_by_email(values["email"])
        if existing is not None and existing.id != exclude_id:
            raise conflict(f"Contact already exists. Existing ID: {existing.id}")
    for name, value in values.items():
        prop = world.properties[object_type].get(name)
        if prop is None or not prop.has_unique_value or not value:
            continue
        for other in world.live(object_type):
            if other.id != exclude_id and other.properties.get(name) == value:
                raise conflict(
                    f"A record with {name} = {value} already exists. Existing ID: {other.id}"
                )


def parse_associations(world: PortalWorld, object_type: str, raw: object) -> list[tuple[str, str]]:
    """Validate `associations` of a create; every target must exist."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise validation_error("associations must be a list")
    by_type_id = {
        type_id: to_type
        for (from_type, to_type), type_id in ASSOCIATION_TYPES.items()
        if from_type == object_type
    }
    found: list[tuple[str, str]] = []
    for item in raw:
        to = item.get("to") if isinstance(item, dict) else None
        types = item.get("types") if isinstance(item, dict) else None
        if not isinstance(to, dict) or "id" not in to or not isinstance(types, list) or not types:
            raise validation_error("Each association needs to.id and types")
        for association_type in types:
            type_id = (
                association_type.get("associationTypeId")
                if isinstance(association_type, dict)
                else None
            )
            to_type = by_type_id.get(type_id) if isinstance(type_id, int) else None
            if to_type is None:
                raise validation_error(
                    f"{type_id} is not a valid association type id for {object_type}",
                    sub_category="crm.associations.INVALID_ASSOCIATION_TYPE",
                )
            target = world.get(to_type, str(to["id"]))
            if target is None:
                raise validation_error(
                    f"One or more associations are invalid: {to_type} {to['id']} was not found",
                    context={"ids": [str(to["id"])]},
                )
            found.append((to_type, target.id))
    return found


def prepare_create(
    world: PortalWorld, object_type: str, body: object, *, pending_emails: set[str] | None = None
) -> PreparedCreate:
    """Validate one create input (`{"properties": ..., "associations": ...}`)."""
    if not isinstance(body, dict):
        raise validation_error("Each input must be a JSON object")
    values = prepare_properties(world, object_type, body.get("properties"), creating=True)
    check_unique(world, object_type, values)
    email = values.get("email", "").lower()
    if pending_emails is not None and email:
        if email in pending_emails:
            raise validation_error(f"Duplicate email {email} in batch input")
        pending_emails.add(email)
    return PreparedCreate(values, parse_associations(world, object_type, body.get("associations")))


def _apply_system_properties(obj: CrmObject, now: float, *, created: bool) -> None:
    created_name, modified_name, id_name = SYSTEM_PROPERTIES[obj.object_type]
    if created:
        obj.properties[created_name] = iso(now)
    obj.properties[modified_name] = iso(now)
    obj.properties[id_name] = obj.id
    obj.updated_at = now
    if obj.object_type == "contacts":
        for source, (national_name, international_name) in CALCULATED_PHONES.items():
            national, international = calculated_phone(obj.properties.get(source, ""))
            for name, value in ((national_name, national), (international_name, international)):
                if value:
                    obj.properties[name] = value
                else:
                    obj.properties.pop(name, None)


def _user_properties(obj: CrmObject, world: PortalWorld) -> dict[str, str]:
    defs = world.properties[obj.object_type]
    return {
        k: v for k, v in obj.properties.items() if v and k in defs and not defs[k].read_only_value
    }


def commit_create(
    state: SandboxState,
    world: PortalWorld,
    object_type: str,
    prepared: PreparedCreate,
    source: ChangeSource,
) -> CrmObject:
    """Store a validated create and emit its webhook events."""
    now = state.now()
    properties = {k: v for k, v in prepared.properties.items() if v != ""}
    obj = CrmObject(world.next_id(object_type), object_type, properties, now, now)
    _apply_system_properties(obj, now, created=True)
    world.objects[object_type][obj.id] = obj
    for to_type, to_id in prepared.associations:
        world.associate(object_type, obj.id, to_type, to_id)
    world.index_write(obj, now, state.config.search_lag_seconds)
    if object_type == "contacts":
        state.emit_contact_event(world, "contact.creation", obj.id, source, changeFlag="NEW")
        _emit_property_changes(state, world, obj, source, _user_properties(obj, world))
    return obj


def _emit_property_changes(
    state: SandboxState,
    world: PortalWorld,
    obj: CrmObject,
    source: ChangeSource,
    changed: dict[str, str],
) -> None:
    subscribed = state.config.webhook_properties
    for name, value in changed.items():
        if subscribed is not None and name not in subscribed:
            continue
        state.emit_contact_event(
            world,
            "contact.propertyChange",
            obj.id,
            source,
            propertyName=name,
            propertyValue=value,
        )


def create_object(
    state: SandboxState, world: PortalWorld, object_type: str, body: object, source: ChangeSource
) -> CrmObject:
    """Validate and store one record."""
    return commit_create(
        state, world, object_type, prepare_create(world, object_type, body), source
    )


def prepare_update(world: PortalWorld, obj: CrmObject, raw_properties: object) -> dict[str, str]:
    """Validate an update of a record."""
    values = prepare_properties(world, obj.object_type, raw_properties, creating=False)
    check_unique(world, obj.object_type, values, exclude_id=obj.id)
    return values


def commit_update(
    state: SandboxState,
    world: PortalWorld,
    obj: CrmObject,
    values: dict[str, str],
    source: ChangeSource,
) -> CrmObject:
    """Apply a validated update and emit a property change per changed value."""
    changed: dict[str, str] = {}
    for name, value in values.items():
        if obj.properties.get(name, "") == value:
            continue
        changed[name] = value
        if value == "":
            obj.properties.pop(name, None)
        else:
            obj.properties[name] = value
    now = state.now()
    _apply_system_properties(obj, now, created=False)
    world.index_write(obj, now, state.config.search_lag_seconds)
    if obj.object_type == "contacts":
        _emit_property_changes(state, world, obj, source, changed)
    return obj


def update_object(
    state: SandboxState,
    world: PortalWorld,
    obj: CrmObject,
    raw_properties: object,
    source: ChangeSource,
) -> CrmObject:
    """Validate and apply an update."""
    return commit_update(state, world, obj, prepare_update(world, obj, raw_properties), source)


def archive_object(
    state: SandboxState, world: PortalWorld, obj: CrmObject, source: ChangeSource
) -> None:
    """Archive (soft-delete) a record."""
    now = state.now()
    obj.archived = True
    obj.archived_at = now
    world.index_write(obj, now, state.config.search_lag_seconds)
    if obj.object_type == "contacts":
        state.emit_contact_event(world, "contact.deletion", obj.id, source, changeFlag="DELETED")


def merge_contacts(
    state: SandboxState,
    world: PortalWorld,
    primary_id: str,
    merged_id: str,
    source: ChangeSource,
) -> CrmObject:
    """Merge one contact into another; the primary keeps its id and its values win."""
    primary = world.get("contacts", primary_id)
    merged = world.get("contacts", merged_id)
    if primary is None or merged is None:
        raise not_found("Contact to merge was not found.", context={"ids": [primary_id, merged_id]})
    if primary.id == merged.id:
        raise validation_error("A contact cannot be merged with itself")
    defs = world.properties["contacts"]
    moved = 0
    for name, value in merged.properties.items():
        definition = defs.get(name)
        if definition is None or definition.read_only_value or not value:
            continue
        if not primary.properties.get(name):
            primary.properties[name] = value
            moved += 1
    earlier = [i for i in primary.properties.get("hs_merged_object_ids", "").split(";") if i]
    merged_earlier = [i for i in merged.properties.get("hs_merged_object_ids", "").split(";") if i]
    primary.properties["hs_merged_object_ids"] = ";".join([*earlier, *merged_earlier, merged.id])
    for to_type in ("calls", "notes"):
        for to_id in world.associated("contacts", merged.id, to_type):
            world.associate("contacts", primary.id, to_type, to_id)
    world.drop_associations("contacts", merged.id)
    merged.archived = True
    merged.archived_at = state.now()
    for alias, target in list(world.merged_into.items()):
        if target == merged.id:
            world.merged_into[alias] = primary.id
    world.merged_into[merged.id] = primary.id
    now = state.now()
    _apply_system_properties(primary, now, created=False)
    world.index_write(primary, now, state.config.search_lag_seconds)
    world.index_write(merged, now, state.config.search_lag_seconds)
    state.emit_contact_event(
        world,
        "contact.merge",
        primary.id,
        source,
        changeFlag="MERGED",
        primaryObjectId=int(primary.id),
        mergedObjectIds=[int(merged.id)],
        newObjectId=int(primary.id),
        numberOfPropertiesMoved=moved,
    )
    return primary


def privacy_delete_contact(
    state: SandboxState, world: PortalWorld, contact: CrmObject, source: ChangeSource
) -> None:
    """Permanently delete a contact (GDPR); HubSpot sends privacyDeletion and deletion."""
    world.objects["contacts"].pop(contact.id, None)
    world.drop_associations("contacts", contact.id)
    for alias, target in list(world.merged_into.items()):
        if target == contact.id:
            del world.merged_into[alias]
    world.index_remove("contacts", contact.id, state.now(), state.config.search_lag_seconds)
    state.emit_contact_event(
        world, "contact.privacyDeletion", contact.id, source, changeFlag="PRIVACY_DELETED"
    )
    state.emit_contact_event(world, "contact.deletion", contact.id, source, changeFlag="DELETED")


def find_object(
    world: PortalWorld, object_type: str, id_value: str, id_property: str | None
) -> CrmObject | None:
    """A live record by id or by a unique property (`idProperty`)."""
    if id_property in (None, "", "hs_object_id"):
        return world.get(object_type, id_value)
    if object_type == "contacts" and id_property == "email":
        return world.find_by_email(id_value)
    prop = world.properties[object_type].get(id_property or "")
    if prop is None or not prop.has_unique_value:
        raise validation_error(
            f"{id_property} is not a unique identifier property for {object_type}",
            sub_category="crm.objects.INVALID_ID_PROPERTY",
        )
    return next(
        (o for o in world.live(object_type) if o.properties.get(prop.name) == id_value), None
    )


def to_json(
    world: PortalWorld,
    obj: CrmObject,
    properties: list[str] | None = None,
    *,
    every_property: bool = False,
    associations: list[str] | None = None,
) -> dict[str, Any]:
    """HubSpot's JSON for a record (`properties` as requested, or the type's defaults)."""
    defs = world.properties[obj.object_type]
    if every_property:
        names = [n for n in obj.properties if n in defs]
    else:
        wanted = list(properties) if properties else list(DEFAULT_READ_PROPERTIES[obj.object_type])
        names = list(dict.fromkeys([*wanted, *SYSTEM_PROPERTIES[obj.object_type]]))
    body: dict[str, Any] = {
        "id": obj.id,
        "properties": {n: (obj.properties.get(n) if n in defs else None) for n in names},
        "createdAt": iso(obj.created_at),
        "updatedAt": iso(obj.updated_at),
        "archived": obj.archived,
    }
    if obj.archived_at is not None:
        body["archivedAt"] = iso(obj.archived_at)
    if associations:
        found: dict[str, Any] = {}
        for to_type in associations:
            type_id = ASSOCIATION_TYPES.get((obj.object_type, to_type))
            ids = world.associated(obj.object_type, obj.id, to_type) if type_id else []
            if ids:
                found[to_type] = {
                    "results": [{"id": i, "type": ASSOCIATION_LABELS[type_id or 0]} for i in ids]
                }
        if found:
            body["associations"] = found
    return body


def seed_demo_data(state: SandboxState, world: PortalWorld) -> None:
    """A few contacts with a typed-by-hand phone, so demos have something to find."""
    people = [
        {
            "firstname": "Grace",
            "lastname": "Hopper",
            "email": "grace@example.com",
            "phone": "(415) 555-0142",
        },
        {
            "firstname": "Alan",
            "lastname": "Turing",
            "email": "alan@example.com",
            "mobilephone": "+1 415-555-0199",
        },
        {"firstname": "Katherine", "lastname": "Johnson", "phone": "415.555.0123"},
    ]
    for person in people:
        create_object(state, world, "contacts", {"properties": person}, UI_SOURCE)
