"""HubSpot's datetime values: ISO 8601 strings or epoch milliseconds, read and written alike."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

# Not str.isdigit() after stripping a sign: it passes "--5", which int() refuses (a crash),
# and other scripts' digits, which are no HubSpot time.
_EPOCH_MS = re.compile(r"-?[0-9]+")


def stamp(moment: datetime) -> str:
    """A UTC timestamp with milliseconds, as HubSpot stores `hs_timestamp`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def millis(value: Any) -> int | None:
    """Epoch milliseconds from a HubSpot datetime value; None when it is not one."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return round(value) if math.isfinite(value) else None
    text = str(value).strip()
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def moment(value: Any) -> datetime | None:
    """The UTC time a HubSpot datetime value names; None when it is not one Python can hold."""
    milliseconds = millis(value)
    if milliseconds is None:
        return None
    try:
        return datetime.fromtimestamp(milliseconds / 1000, UTC)
    except (OverflowError, OSError, ValueError):  # past year 9999, or before year 1
        return None
