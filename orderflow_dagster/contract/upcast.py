"""Upcasters: one small function per version step, lifting a payload to the next version.

Readers see every event at its type's latest version: `upcast` applies the steps in order. The
dbt staging model mirrors these rules in SQL (stg_order_events); the end-to-end test compares
dbt's order_status with an oracle that uses these functions, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orderflow_dagster.contract.registry import LATEST_VERSION

Payload = dict[str, Any]

DEFAULT_CHANNEL = "web"


def order_created_v1_to_v2(payload: Payload) -> Payload:
    """v2 added `channel`; every v1 order came through the web shop."""
    return {**payload, "channel": payload.get("channel") or DEFAULT_CHANNEL}


# (event_type, from_version) -> the step to from_version + 1
UPCASTERS: dict[tuple[str, int], Callable[[Payload], Payload]] = {
    ("OrderCreated", 1): order_created_v1_to_v2,
}


def upcast(event_type: str, version: int, payload: Payload) -> tuple[int, Payload]:
    """The payload lifted to the latest version of its event type, and that version."""
    latest = LATEST_VERSION[event_type]
    while version < latest:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise LookupError(f"no upcaster from {event_type} v{version} to v{version + 1}")
        payload, version = step(payload), version + 1
    return version, payload
