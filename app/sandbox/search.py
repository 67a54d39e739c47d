"""CRM search semantics: filter groups (OR) of filters (AND), operators, sorting and limits."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.sandbox.errors import validation_error
from app.sandbox.properties import PropertyDef, parse_datetime_ms

MAX_GROUPS = 5
MAX_FILTERS_PER_GROUP = 6
MAX_FILTERS = 18
MAX_LIMIT = 200
MAX_RESULTS = 10_000
DEFAULT_LIMIT = 10

OPERATORS = frozenset(
    {
        "EQ",
        "NEQ",
        "LT",
        "LTE",
        "GT",
        "GTE",
        "BETWEEN",
        "IN",
        "NOT_IN",
        "HAS_PROPERTY",
        "NOT_HAS_PROPERTY",
        "CONTAINS_TOKEN",
        "NOT_CONTAINS_TOKEN",
    }
)

# Which properties a free-text `query` looks at.
QUERY_PROPERTIES = {
    "contacts": ("firstname", "lastname", "email", "phone", "mobilephone", "company"),
    "calls": ("hs_call_title", "hs_call_body"),
    "notes": ("hs_note_body",),
}


@dataclass
class Filter:
    """One search filter."""

    property_name: str
    operator: str
    value: str | None = None
    values: list[str] = field(default_factory=list)
    high_value: str | None = None
    # `values` for membership tests: a search compares every record against them.
    value_set: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self.value_set = frozenset(self.values)


@dataclass
class SearchRequest:
    """A validated search body."""

    groups: list[list[Filter]]
    sorts: list[tuple[str, bool]]  # (property, descending)
    query: str
    properties: list[str] | None
    limit: int
    after: int


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_request(body: dict[str, Any], defs: dict[str, PropertyDef]) -> SearchRequest:
    """Validate a search body against HubSpot's limits (400 beyond them)."""
    raw_groups = body.get("filterGroups") or []
    if not isinstance(raw_groups, list):
        raise validation_error("filterGroups must be a list")
    if len(raw_groups) > MAX_GROUPS:
        raise validation_error(
            f"There are too many filter groups ({len(raw_groups)}); the maximum is {MAX_GROUPS}."
        )
    groups: list[list[Filter]] = []
    total = 0
    for raw_group in raw_groups:
        raw_filters = raw_group.get("filters") if isinstance(raw_group, dict) else None
        if not isinstance(raw_filters, list):
            raise validation_error("Each filter group needs a list of filters")
        if len(raw_filters) > MAX_FILTERS_PER_GROUP:
            raise validation_error(
                f"A filter group has too many filters ({len(raw_filters)}); "
                f"the maximum is {MAX_FILTERS_PER_GROUP}."
            )
        total += len(raw_filters)
        groups.append([_parse_filter(f, defs) for f in raw_filters])
    if total > MAX_FILTERS:
        raise validation_error(
            f"There are too many filters ({total}); the maximum is {MAX_FILTERS}."
        )
    limit = body.get("limit", DEFAULT_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise validation_error("limit must be a non-negative integer")
    if limit > MAX_LIMIT:
        raise validation_error(f"limit must be at most {MAX_LIMIT} (got {limit})")
    try:
        after = int(body.get("after") or 0)
    except (TypeError, ValueError):
        raise validation_error("after must be a paging cursor from a previous answer") from None
    if after + limit > MAX_RESULTS:
        raise validation_error(f"Search can page through at most {MAX_RESULTS} results")
    properties = body.get("properties")
    if properties is not None and not (
        isinstance(properties, list) and all(isinstance(p, str) for p in properties)
    ):
        raise validation_error("properties must be a list of property names")
    return SearchRequest(
        groups=groups,
        sorts=_parse_sorts(body.get("sorts") or []),
        query=str(body.get("query") or ""),
        properties=properties or None,
        limit=limit,
        after=after,
    )


def _parse_filter(raw: object, defs: dict[str, PropertyDef]) -> Filter:
    if not isinstance(raw, dict):
        raise validation_error("Each filter must be an object")
    name = raw.get("propertyName")
    operator = raw.get("operator", "EQ")
    if not isinstance(name, str) or not name:
        raise validation_error("Each filter needs a propertyName")
    if operator not in OPERATORS:
        raise validation_error(f"Unknown filter operator {operator!r}")
    if name not in defs and not name.startswith("associations."):
        raise validation_error(f"Property {name!r} does not exist; it cannot be searched")
    values = raw.get("values") or []
    if not isinstance(values, list):
        raise validation_error("values must be a list")
    found = Filter(
        property_name=name,
        operator=operator,
        value=_text(raw.get("value")),
        values=[v for v in (_text(x) for x in values) if v is not None],
        high_value=_text(raw.get("highValue")),
    )
    needs_value = operator not in ("HAS_PROPERTY", "NOT_HAS_PROPERTY", "IN", "NOT_IN")
    if needs_value and found.value is None:
        raise validation_error(f"Operator {operator} needs a value")
    if operator in ("IN", "NOT_IN") and not found.values:
        raise validation_error(f"Operator {operator} needs values")
    if operator == "BETWEEN" and found.high_value is None:
        raise validation_error("Operator BETWEEN needs a highValue")
    return found


def _parse_sorts(raw: object) -> list[tuple[str, bool]]:
    if not isinstance(raw, list):
        raise validation_error("sorts must be a list")
    sorts: list[tuple[str, bool]] = []
    for item in raw:
        if isinstance(item, str):
            sorts.append((item.lstrip("-"), item.startswith("-")))
        elif isinstance(item, dict) and isinstance(item.get("propertyName"), str):
            sorts.append((item["propertyName"], item.get("direction") == "DESCENDING"))
        else:
            raise validation_error("Each sort needs a propertyName")
    return sorts


def _comparable(value: str, prop: PropertyDef | None) -> float | str | None:
    """A value in the form the property's type compares by."""
    if prop is not None and prop.type == "number":
        try:
            return float(value)
        except ValueError:
            return None
    if prop is not None and prop.type in ("datetime", "date"):
        ms = parse_datetime_ms(value)
        return float(ms) if ms is not None else None
    return value.lower()


def _token_match(stored: str, pattern: str) -> bool:
    """CONTAINS_TOKEN: a token of the value matches the pattern, where `*` is a wildcard."""
    regex = re.compile(".*".join(re.escape(part) for part in pattern.lower().split("*")))
    lowered = stored.lower()
    tokens = {lowered, *re.split(r"\s+", lowered), *re.split(r"[^0-9a-z]+", lowered)}
    return any(regex.fullmatch(t) for t in tokens if t)


def filter_matches(
    flt: Filter,
    properties: dict[str, str],
    prop: PropertyDef | None,
    associated: Callable[[str], list[str]],
) -> bool:
    """Whether one record's values satisfy one filter."""
    if flt.property_name.startswith("associations."):
        ids = associated(flt.property_name.split(".", 1)[1])
        if flt.operator == "EQ":
            return flt.value in ids
        if flt.operator == "IN":
            return any(v in ids for v in flt.values)
        if flt.operator == "HAS_PROPERTY":
            return bool(ids)
        if flt.operator == "NOT_HAS_PROPERTY":
            return not ids
        raise validation_error(f"Operator {flt.operator} is not supported on associations")
    raw = properties.get(flt.property_name, "")
    present = raw != ""
    op = flt.operator
    if op == "HAS_PROPERTY":
        return present
    if op == "NOT_HAS_PROPERTY":
        return not present
    if op == "CONTAINS_TOKEN":
        return present and flt.value is not None and _token_match(raw, flt.value)
    if op == "NOT_CONTAINS_TOKEN":
        return not (present and flt.value is not None and _token_match(raw, flt.value))
    if op in ("IN", "NOT_IN"):
        if prop is not None and prop.type in ("number", "datetime", "date"):
            inside = present and _comparable(raw, prop) in {
                _comparable(v, prop) for v in flt.values
            }
        else:
            # HubSpot compares string IN values as given against lower-cased stored values,
            # which is why its docs ask for lowercase values.
            inside = present and raw.lower() in flt.value_set
        return inside if op == "IN" else not inside
    stored = _comparable(raw, prop) if present else None
    wanted = _comparable(flt.value or "", prop)
    if op == "EQ":
        return present and stored == wanted
    if op == "NEQ":
        return not present or stored != wanted
    if stored is None or wanted is None or type(stored) is not type(wanted):
        return False
    if op == "BETWEEN":
        high = _comparable(flt.high_value or "", prop)
        return type(high) is type(stored) and wanted <= stored <= high  # type: ignore[operator]
    return {
        "GT": stored > wanted,  # type: ignore[operator]
        "GTE": stored >= wanted,  # type: ignore[operator]
        "LT": stored < wanted,  # type: ignore[operator]
        "LTE": stored <= wanted,  # type: ignore[operator]
    }[op]


def record_matches(
    request: SearchRequest,
    object_type: str,
    properties: dict[str, str],
    defs: dict[str, PropertyDef],
    associated: Callable[[str], list[str]],
) -> bool:
    """Whether a record is a hit: any group whose filters all hold, and the free-text query."""
    if request.query:
        needle = request.query.lower()
        fields = QUERY_PROPERTIES.get(object_type, ())
        if not any(needle in properties.get(f, "").lower() for f in fields):
            return False
    if not request.groups:
        return True
    return any(
        all(filter_matches(f, properties, defs.get(f.property_name), associated) for f in group)
        for group in request.groups
    )


def compile_matcher(
    request: SearchRequest,
    object_type: str,
    defs: dict[str, PropertyDef],
    associated: Callable[[str], Callable[[str], list[str]]],
) -> Callable[[str, dict[str, str]], bool]:
    """`record_matches` as one function of (id, properties), for every record of a search.

    Groups that are each one IN filter on a text property (how integrations look up
    callers by phone or email) become set lookups; HubSpot answers those from an index,
    and a scan through Python calls per record would slow the sandbox as a portal grows.
    """

    def general(object_id: str, properties: dict[str, str]) -> bool:
        return record_matches(request, object_type, properties, defs, associated(object_id))

    if request.query or not request.groups:
        return general
    # (property, wanted values, the property when its values compare by type, not text)
    lookups: list[tuple[str, frozenset[Any], PropertyDef | None]] = []
    for group in request.groups:
        flt = group[0]
        if len(group) != 1 or flt.operator != "IN" or flt.property_name.startswith("associations."):
            return general
        prop = defs.get(flt.property_name)
        if prop is not None and prop.type in ("number", "datetime", "date"):
            lookups.append(
                (flt.property_name, frozenset(_comparable(v, prop) for v in flt.values), prop)
            )
        else:
            lookups.append((flt.property_name, flt.value_set, None))

    def in_any_group(_object_id: str, properties: dict[str, str]) -> bool:
        for name, values, typed in lookups:
            raw = properties.get(name)
            if not raw:
                continue
            if (raw.lower() if typed is None else _comparable(raw, typed)) in values:
                return True
        return False

    return in_any_group


def sort_key(
    sorts: list[tuple[str, bool]], defs: dict[str, PropertyDef]
) -> Callable[[tuple[str, dict[str, str]]], Any]:
    """A key ordering hits by the requested sorts, then by id."""

    def key(hit: tuple[str, dict[str, str]]) -> Any:
        object_id, properties = hit
        parts: list[Any] = []
        for name, descending in sorts:
            value = _comparable(properties.get(name, ""), defs.get(name))
            missing = value in (None, "")
            rank: Any = value if not missing else ""
            if isinstance(rank, float):
                rank = -rank if descending else rank
                parts.append((missing, 0, rank))
            else:
                parts.append((missing, 1, _Reversed(str(rank)) if descending else str(rank)))
        parts.append(int(object_id))
        return tuple(parts)

    return key


class _Reversed:
    """Wraps a string so it sorts in reverse."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __lt__(self, other: _Reversed) -> bool:
        return self.value > other.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)
