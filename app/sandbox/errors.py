"""HubSpot-shaped error answers.

Every API error the sandbox gives is an `ApiError` carrying the status and the JSON body
HubSpot would send: `{"status": "error", "message", "correlationId", "category", ...}`.
OAuth token endpoints use their own shape (`oauth_error`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any


class ApiError(Exception):
    """An HTTP error answer with a HubSpot-shaped JSON body."""

    def __init__(
        self, status_code: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status_code} {body.get('category') or body.get('status')}")
        self.status_code = status_code
        self.body = body
        self.headers = headers or {}


def correlation_id() -> str:
    """A fresh correlation id, as HubSpot attaches to every answer."""
    return str(uuid.uuid4())


def hubspot_error(
    status_code: int,
    category: str,
    message: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    context: dict[str, Any] | None = None,
    sub_category: str | None = None,
) -> ApiError:
    """An `ApiError` with HubSpot's standard error body."""
    body: dict[str, Any] = {
        "status": "error",
        "message": message,
        "correlationId": correlation_id(),
        "category": category,
    }
    if sub_category:
        body["subCategory"] = sub_category
    if context is not None:
        body["context"] = context
    if errors is not None:
        body["errors"] = errors
    return ApiError(status_code, body)


def validation_error(message: str, **kwargs: Any) -> ApiError:
    """400 VALIDATION_ERROR."""
    return hubspot_error(400, "VALIDATION_ERROR", message, **kwargs)


def property_errors(problems: list[dict[str, str]]) -> ApiError:
    """400 VALIDATION_ERROR listing invalid property values, worded as HubSpot words it."""
    detail = [
        {
            "isValid": False,
            "message": p["message"],
            "error": p["error"],
            "name": p["name"],
            "localizedErrorMessage": p["message"],
        }
        for p in problems
    ]
    return validation_error(
        "Property values were not valid: " + json.dumps(detail, separators=(",", ":")),
        errors=[
            {"message": p["message"], "code": p["error"], "context": {"propertyName": [p["name"]]}}
            for p in problems
        ],
    )


def not_found(message: str = "resource not found", **kwargs: Any) -> ApiError:
    """404 OBJECT_NOT_FOUND."""
    return hubspot_error(404, "OBJECT_NOT_FOUND", message, **kwargs)


def conflict(message: str) -> ApiError:
    """409 CONFLICT (a duplicate unique value such as a contact's email)."""
    return hubspot_error(409, "CONFLICT", message)


def missing_scopes(required: list[str]) -> ApiError:
    """403 MISSING_SCOPES for a token that lacks the scope an endpoint needs."""
    return hubspot_error(
        403,
        "MISSING_SCOPES",
        "This app hasn't been granted all required scopes to make this call. "
        "Read more about required scopes here: https://developers.hubspot.com/scopes.",
        errors=[
            {
                "message": "One or more of the following scopes are required.",
                "context": {"requiredGranularScopes": required},
            }
        ],
    )


def oauth_error(status: str, error: str, description: str, status_code: int = 400) -> ApiError:
    """A token-endpoint error: HubSpot's `status`/`message` plus RFC 6749's `error` fields."""
    return ApiError(
        status_code,
        {
            "status": status,
            "message": description,
            "correlationId": correlation_id(),
            "error": error,
            "error_description": description,
        },
    )
