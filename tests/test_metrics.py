"""/metrics: counters move with what the routes and the worker do; no label names a portal."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import endpoint_label
from tests.webhook_support import call_event


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(snapshot: dict[Any, float], name: str, **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_accepted_duplicate_and_rejected_events(
    client: httpx.AsyncClient, install_portal: Any
) -> None:
    portal = await install_portal(1001)
    before = samples((await client.get("/metrics")).text)
    auth = {"Authorization": f"Bearer {portal.webhook_secret}"}
    path = f"/webhooks/portals/{portal.portal_id}/receptionist"
    event = call_event(id="evt-metrics-1")
    assert (await client.post(path, json=event, headers=auth)).status_code == 202
    assert (await client.post(path, json=event, headers=auth)).status_code == 200
    assert (
        await client.post(path, json=event, headers={"Authorization": "Bearer wrong"})
    ).status_code == 401
    no_caller = call_event(id="evt-metrics-2", caller={"name": "Nobody"})
    assert (await client.post(path, json=no_caller, headers=auth)).status_code == 422
    response = await client.get("/metrics")
    assert response.status_code == 200
    after = samples(response.text)

    def delta(outcome: str, reason: str = "") -> float:
        labels = {"source": "receptionist", "outcome": outcome, "reason": reason}
        return value(after, "hubline_webhook_events_total", **labels) - value(
            before, "hubline_webhook_events_total", **labels
        )

    assert delta("accepted") == 1
    assert delta("duplicate") == 1
    assert delta("rejected", "unauthorized") == 1
    assert delta("rejected", "invalid_event") == 1
    assert value(after, "hubline_inbox_events", status="pending") >= 1
    assert value(after, "hubline_portals", status="active") == 1
    assert value(after, "hubline_oldest_pending_event_age_seconds") >= 0
    label_values = {v for (_name, labels) in after for _key, v in labels}
    assert str(portal.portal_id) not in label_values, "no label may name a portal"


def test_endpoint_labels_fold_ids_so_labels_stay_few() -> None:
    assert endpoint_label("/crm/v3/objects/contacts/12345") == "/crm/v3/objects/contacts/{id}"
    assert endpoint_label("/crm/v3/objects/contacts/ada@example.com?idProperty=email") == (
        "/crm/v3/objects/contacts/{id}"
    )
    assert (
        endpoint_label("/crm/v3/objects/contacts/batch/create")
        == "/crm/v3/objects/contacts/batch/create"
    )
