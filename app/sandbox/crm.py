"""CRM object endpoints: records, batches, search, merge, privacy deletion, associations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from app.sandbox import objects
from app.sandbox.errors import ApiError, not_found, validation_error
from app.sandbox.gateway import ApiContext, api_route, batch_answer, json_response, read_json
from app.sandbox.properties import DEFAULT_READ_PROPERTIES, OBJECT_TYPE_ALIASES, OBJECT_TYPES
from app.sandbox.search import compile_matcher, parse_request, sort_key
from app.sandbox.state import ASSOCIATION_TYPES, CrmObject, PortalWorld

BATCH_LIMIT = 100
# HubSpot's cap on the records one association batch read names (since February 2025).
ASSOCIATION_READ_LIMIT = 1000
# Associations one record's entry of a batch read lists before it pages (`after`).
ASSOCIATION_PAGE_SIZE = 100
LIST_LIMIT = 100
READ_SCOPES = ("crm.objects.contacts.read", "crm.objects.contacts.write")
WRITE_SCOPE = "crm.objects.contacts.write"


def resolve_type(raw: str) -> str:
    """An object type name from a path segment (names, singulars and type ids)."""
    object_type = OBJECT_TYPE_ALIASES.get(raw.lower(), raw.lower())
    if object_type not in OBJECT_TYPES:
        raise validation_error(f"Unable to infer object type from: {raw}")
    return object_type


def _object_type(request: Request) -> str:
    return resolve_type(str(request.path_params["object_type"]))


def _list_param(request: Request, name: str) -> list[str] | None:
    values = [v for raw in request.query_params.getlist(name) for v in raw.split(",") if v]
    return values or None


def _not_found(object_id: str) -> ApiError:
    return not_found(
        "Object not found.  objectId are usually numeric.", context={"id": [object_id]}
    )


def _missing_error(object_type: str, ids: list[str]) -> dict[str, Any]:
    label = object_type.rstrip("s").upper()
    return {
        "status": "error",
        "category": "OBJECT_NOT_FOUND",
        "message": (
            f"Could not get some {label} objects, they may be deleted or not exist. "
            "Check that ids are valid."
        ),
        "context": {"ids": ids},
    }


async def list_objects(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v3/objects/{type}: a page of records ordered by id."""
    ctx.require_scope(*READ_SCOPES)
    object_type = _object_type(request)
    world = ctx.portal
    try:
        limit = int(request.query_params.get("limit", "10"))
        after = int(request.query_params.get("after", "0") or 0)
    except ValueError:
        raise validation_error("limit and after must be integers") from None
    if not 1 <= limit <= LIST_LIMIT:
        raise validation_error(f"limit must be between 1 and {LIST_LIMIT}")
    records = sorted(
        (o for o in world.live(object_type) if int(o.id) >= after), key=lambda o: int(o.id)
    )
    page = records[:limit]
    properties = _list_param(request, "properties")
    associations = _list_param(request, "associations")
    body: dict[str, Any] = {
        "results": [objects.to_json(world, o, properties, associations=associations) for o in page]
    }
    if len(records) > limit:
        next_after = records[limit].id
        body["paging"] = {
            "next": {
                "after": next_after,
                "link": f"{request.url.path}?after={next_after}&limit={limit}",
            }
        }
    return json_response(body)


async def create(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/objects/{type}."""
    ctx.require_scope(WRITE_SCOPE)
    object_type = _object_type(request)
    body = await read_json(request)
    obj = objects.create_object(ctx.state, ctx.portal, object_type, body, ctx.state.api_source())
    return json_response(objects.to_json(ctx.portal, obj, every_property=True), 201)


def _find(request: Request, ctx: ApiContext, object_type: str) -> CrmObject:
    object_id = str(request.path_params["object_id"])
    obj = objects.find_object(
        ctx.portal, object_type, object_id, request.query_params.get("idProperty")
    )
    if obj is None:
        raise _not_found(object_id)
    return obj


async def read_one(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v3/objects/{type}/{id} (or an email with idProperty=email)."""
    ctx.require_scope(*READ_SCOPES)
    object_type = _object_type(request)
    obj = _find(request, ctx, object_type)
    return json_response(
        objects.to_json(
            ctx.portal,
            obj,
            _list_param(request, "properties"),
            associations=_list_param(request, "associations"),
        )
    )


async def update_one(request: Request, ctx: ApiContext) -> Response:
    """PATCH /crm/v3/objects/{type}/{id}."""
    ctx.require_scope(WRITE_SCOPE)
    object_type = _object_type(request)
    body = await read_json(request)
    obj = _find(request, ctx, object_type)
    objects.update_object(
        ctx.state, ctx.portal, obj, body.get("properties"), ctx.state.api_source()
    )
    return json_response(objects.to_json(ctx.portal, obj, every_property=True))


async def archive_one(request: Request, ctx: ApiContext) -> Response:
    """DELETE /crm/v3/objects/{type}/{id}: archive; answers 204 even for an unknown id."""
    ctx.require_scope(WRITE_SCOPE)
    object_type = _object_type(request)
    obj = ctx.portal.get(object_type, str(request.path_params["object_id"]))
    if obj is not None:
        objects.archive_object(ctx.state, ctx.portal, obj, ctx.state.api_source())
    return Response(status_code=204)


async def search(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/objects/{type}/search: what the (lagging) search index sees."""
    ctx.require_scope(*READ_SCOPES)
    object_type = _object_type(request)
    world = ctx.portal
    defs = world.properties[object_type]
    query = parse_request(await read_json(request), defs)
    now = ctx.state.now()

    def associated_with(object_id: str) -> Callable[[str], list[str]]:
        def lookup(target: str) -> list[str]:
            return world.associated(object_type, object_id, resolve_type(target))

        return lookup

    matches = compile_matcher(query, object_type, defs, associated_with)
    hits = [
        (object_id, props)
        for object_id, props in world.searchable(object_type, now)
        if matches(object_id, props)
    ]
    hits.sort(key=sort_key(query.sorts, defs))
    page = hits[query.after : query.after + query.limit]
    names = query.properties or list(DEFAULT_READ_PROPERTIES[object_type])
    names = list(dict.fromkeys([*names, *objects.SYSTEM_PROPERTIES[object_type]]))
    created_name, modified_name, _ = objects.SYSTEM_PROPERTIES[object_type]
    results = [
        {
            "id": object_id,
            "properties": {n: (props.get(n) if n in defs else None) for n in names},
            "createdAt": props.get(created_name),
            "updatedAt": props.get(modified_name),
            "archived": False,
        }
        for object_id, props in page
    ]
    body: dict[str, Any] = {"total": len(hits), "results": results}
    if query.after + query.limit < len(hits):
        body["paging"] = {"next": {"after": str(query.after + query.limit)}}
    return json_response(body)


def _inputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise validation_error("inputs must be a list of objects")
    if len(inputs) > BATCH_LIMIT:
        raise validation_error(
            f"Too many inputs: {len(inputs)}. The batch input limit is {BATCH_LIMIT}.",
            context={"limit": [str(BATCH_LIMIT)]},
        )
    return inputs


def _ids(inputs: list[dict[str, Any]]) -> list[str]:
    ids = [str(i.get("id", "")) for i in inputs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise validation_error(
            f"Duplicate IDs found in batch input: {duplicates}. IDs must be unique"
        )
    return ids


async def batch(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/objects/{type}/batch/{action}."""
    object_type = _object_type(request)
    action = request.path_params["action"]
    ctx.require_scope(*(READ_SCOPES if action == "read" else (WRITE_SCOPE,)))
    body = await read_json(request)
    inputs = _inputs(body)
    world = ctx.portal
    state = ctx.state
    started = state.now()
    source = state.api_source()
    if action == "create":
        pending: set[str] = set()
        prepared = [
            objects.prepare_create(world, object_type, i, pending_emails=pending) for i in inputs
        ]
        created = [objects.commit_create(state, world, object_type, p, source) for p in prepared]
        results = [objects.to_json(world, o, every_property=True) for o in created]
        return json_response(batch_answer(started, results, state.now()), 201)
    if action == "read":
        return _batch_read(ctx, object_type, body, inputs, started)
    if action == "update":
        id_property = _id_property(inputs)
        found: list[tuple[CrmObject, dict[str, str]]] = []
        missing: list[str] = []
        for item, object_id in zip(inputs, _ids(inputs), strict=True):
            obj = objects.find_object(
                world, object_type, object_id, item.get("idProperty") or id_property
            )
            if obj is None:
                missing.append(object_id)
            else:
                found.append((obj, objects.prepare_update(world, obj, item.get("properties"))))
        updated = [objects.commit_update(state, world, o, v, source) for o, v in found]
        results = [objects.to_json(world, o, every_property=True) for o in updated]
        errors = [_missing_error(object_type, missing)] if missing else []
        return json_response(
            batch_answer(started, results, state.now(), errors), 207 if errors else 200
        )
    if action == "upsert":
        return _batch_upsert(ctx, object_type, inputs, started)
    if action == "archive":
        for object_id in _ids(inputs):
            obj = world.get(object_type, object_id)
            if obj is not None:
                objects.archive_object(state, world, obj, source)
        return Response(status_code=204)
    raise not_found(f"Unknown batch action {action!r}")


def _id_property(inputs: list[dict[str, Any]]) -> str | None:
    names = {i.get("idProperty") for i in inputs if i.get("idProperty")}
    return str(names.pop()) if len(names) == 1 else None


def _batch_read(
    ctx: ApiContext,
    object_type: str,
    body: dict[str, Any],
    inputs: list[dict[str, Any]],
    started: float,
) -> Response:
    world = ctx.portal
    id_property = body.get("idProperty")
    properties = body.get("properties") or None
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    seen: set[str] = set()
    for object_id in dict.fromkeys(str(i.get("id", "")) for i in inputs):
        obj = objects.find_object(world, object_type, object_id, id_property)
        if obj is None:
            missing.append(object_id)
        elif obj.id not in seen:
            seen.add(obj.id)
            results.append(objects.to_json(world, obj, properties))
    errors = [_missing_error(object_type, missing)] if missing else []
    return json_response(
        batch_answer(started, results, ctx.state.now(), errors), 207 if errors else 200
    )


def _batch_upsert(
    ctx: ApiContext, object_type: str, inputs: list[dict[str, Any]], started: float
) -> Response:
    world = ctx.portal
    state = ctx.state
    _ids(inputs)
    plan: list[tuple[CrmObject | None, Any]] = []
    pending: set[str] = set()
    for item in inputs:
        id_property = item.get("idProperty")
        if not id_property:
            raise validation_error("Each upsert input needs an idProperty")
        object_id = str(item.get("id", ""))
        existing = objects.find_object(world, object_type, object_id, str(id_property))
        if existing is not None:
            plan.append((existing, objects.prepare_update(world, existing, item.get("properties"))))
            continue
        properties = dict(item.get("properties") or {})
        properties[str(id_property)] = object_id
        plan.append(
            (
                None,
                objects.prepare_create(
                    world, object_type, {"properties": properties}, pending_emails=pending
                ),
            )
        )
    results: list[dict[str, Any]] = []
    for existing, prepared in plan:
        if existing is not None:
            obj = objects.commit_update(state, world, existing, prepared, state.api_source())
        else:
            obj = objects.commit_create(state, world, object_type, prepared, state.api_source())
        results.append(
            {**objects.to_json(world, obj, every_property=True), "new": existing is None}
        )
    return json_response(batch_answer(started, results, state.now()))


async def merge(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/objects/contacts/merge."""
    ctx.require_scope(WRITE_SCOPE)
    body = await read_json(request)
    primary = objects.merge_contacts(
        ctx.state,
        ctx.portal,
        str(body.get("primaryObjectId", "")),
        str(body.get("objectIdToMerge", "")),
        ctx.state.api_source(),
    )
    return json_response(objects.to_json(ctx.portal, primary, every_property=True))


async def gdpr_delete(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v3/objects/contacts/gdpr-delete: permanent privacy deletion."""
    ctx.require_scope(WRITE_SCOPE)
    body = await read_json(request)
    object_id = str(body.get("objectId", ""))
    contact = objects.find_object(ctx.portal, "contacts", object_id, body.get("idProperty"))
    if contact is None:
        raise _not_found(object_id)
    objects.privacy_delete_contact(ctx.state, ctx.portal, contact, ctx.state.api_source())
    return Response(status_code=204)


def _associable(world: PortalWorld, request: Request) -> tuple[CrmObject, CrmObject]:
    from_type = resolve_type(str(request.path_params["object_type"]))
    to_type = resolve_type(str(request.path_params["to_type"]))
    if (from_type, to_type) not in ASSOCIATION_TYPES:
        raise validation_error(f"{from_type} cannot be associated with {to_type}")
    source = world.get(from_type, str(request.path_params["object_id"]))
    target = world.get(to_type, str(request.path_params["to_id"]))
    if source is None or target is None:
        raise _not_found(str(request.path_params["object_id"]))
    return source, target


async def associate_default(request: Request, ctx: ApiContext) -> Response:
    """PUT /crm/v4/objects/{type}/{id}/associations/default/{toType}/{toId}."""
    ctx.require_scope(WRITE_SCOPE)
    source, target = _associable(ctx.portal, request)
    ctx.portal.associate(source.object_type, source.id, target.object_type, target.id)
    type_id = ASSOCIATION_TYPES[(source.object_type, target.object_type)]
    result = {
        "fromObjectTypeId": source.object_type,
        "fromObjectId": int(source.id),
        "toObjectTypeId": target.object_type,
        "toObjectId": int(target.id),
        "labels": [],
        "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": None}],
    }
    return json_response(batch_answer(ctx.state.now(), [result], ctx.state.now()))


async def associate_typed(request: Request, ctx: ApiContext) -> Response:
    """PUT /crm/v3/objects/{type}/{id}/associations/{toType}/{toId}/{typeId}."""
    ctx.require_scope(WRITE_SCOPE)
    source, target = _associable(ctx.portal, request)
    if (
        str(ASSOCIATION_TYPES[(source.object_type, target.object_type)])
        != request.path_params["type_id"]
    ):
        raise validation_error(f"{request.path_params['type_id']} is not a valid association type")
    ctx.portal.associate(source.object_type, source.id, target.object_type, target.id)
    return json_response(objects.to_json(ctx.portal, source, associations=[target.object_type]))


async def list_associations(request: Request, ctx: ApiContext) -> Response:
    """GET /crm/v4/objects/{type}/{id}/associations/{toType}."""
    ctx.require_scope(*READ_SCOPES)
    from_type = _object_type(request)
    to_type = resolve_type(str(request.path_params["to_type"]))
    source = ctx.portal.get(from_type, str(request.path_params["object_id"]))
    if source is None:
        raise _not_found(str(request.path_params["object_id"]))
    type_id = ASSOCIATION_TYPES.get((from_type, to_type))
    ids = ctx.portal.associated(from_type, source.id, to_type) if type_id else []
    return json_response(
        {
            "results": [
                {
                    "toObjectId": int(i),
                    "associationTypes": [
                        {"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": None}
                    ],
                }
                for i in ids
            ]
        }
    )


async def batch_read_associations(request: Request, ctx: ApiContext) -> Response:
    """POST /crm/v4/associations/{fromType}/{toType}/batch/read.

    One entry per input with associations, a page at a time (an input's `after` asks for
    the next). An input with none, or naming no record, is an error entry
    `crm.associations.NO_ASSOCIATIONS_FOUND`, and the answer is then 207, as HubSpot's is.
    """
    ctx.require_scope(*READ_SCOPES)
    from_type = _object_type(request)
    to_type = resolve_type(str(request.path_params["to_type"]))
    inputs = (await read_json(request)).get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise validation_error("inputs must be a list of objects")
    if len(inputs) > ASSOCIATION_READ_LIMIT:
        raise validation_error(
            f"Too many inputs: {len(inputs)}. The limit is {ASSOCIATION_READ_LIMIT}.",
            context={"limit": [str(ASSOCIATION_READ_LIMIT)]},
        )
    started = ctx.state.now()
    type_id = ASSOCIATION_TYPES.get((from_type, to_type))
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for item in inputs:
        object_id = str(item.get("id", ""))
        after = str(item.get("after") or "0")
        start = int(after) if after.isdigit() else 0
        source = ctx.portal.get(from_type, object_id)
        ids = ctx.portal.associated(from_type, source.id, to_type) if source and type_id else []
        page = ids[start : start + ASSOCIATION_PAGE_SIZE]
        if not page:
            errors.append(_no_associations_error(from_type, to_type, object_id))
            continue
        entry: dict[str, Any] = {
            "from": {"id": object_id},
            "to": [
                {
                    "toObjectId": int(i),
                    "associationTypes": [
                        {"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": None}
                    ],
                }
                for i in page
            ],
        }
        if start + ASSOCIATION_PAGE_SIZE < len(ids):
            entry["paging"] = {"next": {"after": str(start + ASSOCIATION_PAGE_SIZE)}}
        results.append(entry)
    return json_response(
        batch_answer(started, results, ctx.state.now(), errors), 207 if errors else 200
    )


def _no_associations_error(from_type: str, to_type: str, object_id: str) -> dict[str, Any]:
    singular_from, singular_to = from_type.removesuffix("s"), to_type.removesuffix("s")
    return {
        "status": "error",
        "category": "OBJECT_NOT_FOUND",
        "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
        "message": f"No {singular_to} is associated with {singular_from} {object_id}.",
        "context": {
            "fromObjectId": [object_id],
            "fromObjectType": [singular_from],
            "toObjectType": [singular_to],
        },
    }


def routes() -> list[BaseRoute]:
    """The CRM object routes (specific paths before the `{object_id}` ones)."""
    base = "/crm/v3/objects/{object_type}"
    return [
        api_route("/crm/v3/objects/contacts/merge", merge, methods=["POST"]),
        api_route("/crm/v3/objects/contacts/gdpr-delete", gdpr_delete, methods=["POST"]),
        api_route(f"{base}/search", search, methods=["POST"], search=True),
        api_route(f"{base}/batch/{{action}}", batch, methods=["POST"]),
        api_route(base, list_objects, methods=["GET"]),
        api_route(base, create, methods=["POST"]),
        api_route(f"{base}/{{object_id}}", read_one, methods=["GET"]),
        api_route(f"{base}/{{object_id}}", update_one, methods=["PATCH"]),
        api_route(f"{base}/{{object_id}}", archive_one, methods=["DELETE"]),
        api_route(
            f"{base}/{{object_id}}/associations/{{to_type}}/{{to_id}}/{{type_id}}",
            associate_typed,
            methods=["PUT"],
        ),
        api_route(
            "/crm/v4/objects/{object_type}/{object_id}/associations/default/{to_type}/{to_id}",
            associate_default,
            methods=["PUT"],
        ),
        api_route(
            "/crm/v4/objects/{object_type}/{object_id}/associations/{to_type}",
            list_associations,
            methods=["GET"],
        ),
        api_route(
            "/crm/v4/associations/{object_type}/{to_type}/batch/read",
            batch_read_associations,
            methods=["POST"],
        ),
    ]
