"""Properties API: property definitions and property groups per object type."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from app.sandbox.crm import resolve_type
from app.sandbox.errors import ApiError, hubspot_error, not_found, validation_error
from app.sandbox.gateway import ApiContext, api_route, batch_answer, json_response, read_json
from app.sandbox.properties import (
    BOOL_OPTIONS,
    PropertyDef,
    PropertyGroup,
    clean_options,
    validate_definition,
)
from app.sandbox.state import PortalWorld


def _scopes(*, write: bool) -> tuple[str, ...]:
    # Only the contacts schema scopes exist in the sandbox's tiers; engagements ride on them.
    if write:
        return ("crm.schemas.contacts.write",)
    return ("crm.schemas.contacts.read", "crm.schemas.contacts.write")


def _exists(name: str) -> ApiError:
    return hubspot_error(409, "OBJECT_ALREADY_EXISTS", f"Property named '{name}' already exists.")


def create_property(
    world: PortalWorld, object_type: str, body: dict[str, Any], now: float
) -> PropertyDef:
    """Validate and add a property definition (409 if the name is taken)."""
    validate_definition(body, world.groups[object_type])
    name = str(body["name"])
    if name in world.properties[object_type]:
        raise _exists(name)
    type_ = str(body["type"])
    raw_options = body.get("options")
    if type_ == "bool" and not raw_options:
        options = [dict(o) for o in BOOL_OPTIONS]
    else:
        options = clean_options(raw_options or [])
    prop = PropertyDef(
        name=name,
        label=str(body["label"]),
        type=type_,
        field_type=str(body["fieldType"]),
        group_name=str(body["groupName"]),
        description=str(body.get("description", "")),
        options=options,
        display_order=int(body.get("displayOrder", -1)),
        has_unique_value=bool(body.get("hasUniqueValue", False)),
        hidden=bool(body.get("hidden", False)),
        form_field=bool(body.get("formField", True)),
        created_at=now,
        updated_at=now,
    )
    world.properties[object_type][name] = prop
    return prop


def _property(world: PortalWorld, object_type: str, name: str) -> PropertyDef:
    prop = world.properties[object_type].get(name)
    if prop is None:
        raise not_found(f"Unable to find property {name} for object type {object_type}")
    return prop


async def list_properties(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v3/properties/{type}."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=False))
    props = ctx.portal.properties[object_type].values()
    return json_response({"results": [p.to_json() for p in props]})


async def post_property(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/properties/{type}."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=True))
    body = await read_json(request)
    prop = create_property(ctx.portal, object_type, body, ctx.state.now())
    return json_response(prop.to_json(), 201)


async def batch_create_properties(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/properties/{type}/batch/create: existing names are reported, not fatal."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=True))
    inputs = (await read_json(request)).get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise validation_error("inputs must be a list of objects")
    for item in inputs:
        validate_definition(item, ctx.portal.groups[object_type])
    started = ctx.state.now()
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for item in inputs:
        try:
            results.append(create_property(ctx.portal, object_type, item, started).to_json())
        except ApiError as error:
            errors.append({**error.body, "context": {"name": [str(item.get("name"))]}})
    body = batch_answer(started, results, ctx.state.now(), errors)
    return json_response(body, 207 if errors else 201)


async def get_property(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v3/properties/{type}/{name}."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=False))
    return json_response(_property(ctx.portal, object_type, request.path_params["name"]).to_json())


async def patch_property(request: Request, ctx: ApiContext) -> Response:
    """PATCH /crm/v3/properties/{type}/{name}: label, group, options (e.g. a new option), type."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=True))
    prop = _property(ctx.portal, object_type, request.path_params["name"])
    body = await read_json(request)
    if prop.read_only_value and body:
        raise validation_error(f"{prop.name} is a read-only HubSpot property")
    if "fieldType" in body and "type" not in body:
        body["type"] = prop.type
    validate_definition(body, ctx.portal.groups[object_type], partial=True)
    if prop.hubspot_defined and ("type" in body and body["type"] != prop.type):
        raise validation_error(f"The type of HubSpot property {prop.name} cannot change")
    if "label" in body:
        prop.label = str(body["label"])
    if "description" in body:
        prop.description = str(body["description"])
    if "groupName" in body:
        prop.group_name = str(body["groupName"])
    if "type" in body:
        prop.type = str(body["type"])
    if "fieldType" in body:
        prop.field_type = str(body["fieldType"])
    if "options" in body:
        prop.options = clean_options(body["options"])
    for key, attr in (
        ("displayOrder", "display_order"),
        ("hidden", "hidden"),
        ("formField", "form_field"),
    ):
        if key in body:
            setattr(prop, attr, type(getattr(prop, attr))(body[key]))
    prop.updated_at = ctx.state.now()
    return json_response(prop.to_json())


async def delete_property(request: Request, ctx: ApiContext) -> Response:
    """DELETE /crm/v3/properties/{type}/{name}: archive a custom property."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=True))
    prop = _property(ctx.portal, object_type, request.path_params["name"])
    if prop.hubspot_defined:
        raise validation_error(f"{prop.name} is a HubSpot-defined property and cannot be deleted")
    del ctx.portal.properties[object_type][prop.name]
    return Response(status_code=204)


async def list_groups(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v3/properties/{type}/groups."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=False))
    return json_response(
        {"results": [g.to_json() for g in ctx.portal.groups[object_type].values()]}
    )


async def post_group(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/properties/{type}/groups."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=True))
    body = await read_json(request)
    name, label = body.get("name"), body.get("label")
    if not isinstance(name, str) or not name or not isinstance(label, str) or not label:
        raise validation_error("A property group needs a name and a label")
    groups = ctx.portal.groups[object_type]
    if name in groups:
        raise hubspot_error(
            409, "OBJECT_ALREADY_EXISTS", f"Property group '{name}' already exists."
        )
    groups[name] = PropertyGroup(name, label, int(body.get("displayOrder", -1)))
    return json_response(groups[name].to_json(), 201)


async def get_group(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v3/properties/{type}/groups/{name}."""
    object_type = resolve_type(request.path_params["object_type"])
    ctx.require_scope(*_scopes(write=False))
    group = ctx.portal.groups[object_type].get(request.path_params["name"])
    if group is None:
        raise not_found(f"Unable to find property group {request.path_params['name']}")
    return json_response(group.to_json())


def routes() -> list[BaseRoute]:
    """The properties API routes (groups before `{name}`)."""
    base = "/crm/v3/properties/{object_type}"
    return [
        api_route(f"{base}/groups", list_groups, methods=["GET"]),
        api_route(f"{base}/groups", post_group, methods=["POST"]),
        api_route(f"{base}/groups/{{name}}", get_group, methods=["GET"]),
        api_route(f"{base}/batch/create", batch_create_properties, methods=["POST"]),
        api_route(base, list_properties, methods=["GET"]),
        api_route(base, post_property, methods=["POST"]),
        api_route(f"{base}/{{name}}", get_property, methods=["GET"]),
        api_route(f"{base}/{{name}}", patch_property, methods=["PATCH"]),
        api_route(f"{base}/{{name}}", delete_property, methods=["DELETE"]),
    ]
