"""Everything Hubline says to HubSpot: the API client, its refresh middleware and rate
budget, and the OAuth endpoints."""

from app.hubspot.client import HubSpotClient, error_from_response, hubspot_client
from app.hubspot.oauth2 import HubSpotOAuth, TokenResponse
from app.hubspot.runtime import Backoff, HubSpotRuntime

__all__ = [
    "Backoff",
    "HubSpotClient",
    "HubSpotOAuth",
    "HubSpotRuntime",
    "TokenResponse",
    "error_from_response",
    "hubspot_client",
]
