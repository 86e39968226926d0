"""What the dbt marts should contain, computed in plain Python from the landed records.

A pure reference implementation of the dbt project's rules, for tests to compare the database
against, row for row. Input is the list of landed raw records: each a dict holding the event
envelope (as produced to Kafka) plus where and when it was landed:

    {
        # the envelope
        "event_id": "6f1c...",  # str or uuid.UUID
        "aggregate_id": "ord-42",
        "event_type": "OrderCreated",
        "payload": {...},  # dict
        "timestamp": 1700000000000,  # epoch ms
        "schema_version": 1,
        # the record
        "trace_id": None,  # optional
        "topic": "orders.events",
        "kafka_partition": 0,
        "kafka_offset": 17,
        # the landing: the landing transaction's start time (raw.order_events.landed_at); any
        # totally ordered value works, e.g. a landing sequence number, if only order matters
        "landed_at": datetime(...),
    }

`landed(envelope, ...)` builds one from an envelope. The rules mirrored here:

- dedup: of the copies of an event_id, the first landed wins by
  (landed_at, topic, kafka_partition, kafka_offset);
- upcasting: OrderCreated schema_version 1 has channel 'web'; unknown fields are ignored;
- order status: the status of the order's latest distinct event by (timestamp, event_id), where
  event ids compare as UUIDs (byte order, as in Postgres);
- an order's customer and order fields come from its earliest OrderCreated (same order);
- *_at: the first event time of each status.
"""

from __future__ import annotations

import csv
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from orderflow_dagster.contract.upcast import upcast

STATUS_BY_EVENT_TYPE = {
    "OrderCreated": "created",
    "PaymentProcessed": "paid",
    "ItemShipped": "shipped",
    "OrderDelivered": "delivered",
    "OrderCancelled": "cancelled",
}
MILESTONE_COLUMN = {
    "created": "created_at",
    "paid": "paid_at",
    "shipped": "shipped_at",
    "delivered": "delivered_at",
    "cancelled": "cancelled_at",
}
# the columns of analytics.order_status the oracle predicts (all but updated_at)
ORDER_STATUS_COLUMNS = (
    "order_id",
    "status",
    "customer_id",
    "customer_name",
    "customer_segment",
    "order_total",
    "currency",
    "channel",
    "created_at",
    "paid_at",
    "shipped_at",
    "delivered_at",
    "cancelled_at",
    "last_event_id",
    "last_event_type",
    "last_event_at",
    "last_trace_id",
    "event_count",
)
ORDER_STATUS_HISTORY_COLUMNS = (
    "order_id",
    "event_id",
    "status",
    "previous_status",
    "transitioned_at",
    "sequence_number",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NUMERIC_STRING = re.compile(r"^\s*-?[0-9]+(\.[0-9]+)?\s*$")


def landed(
    envelope: Mapping[str, Any],
    *,
    topic: str,
    kafka_partition: int,
    kafka_offset: int,
    landed_at: Any,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """A landed record: the envelope plus its coordinates and landing time."""
    return {
        **envelope,
        "trace_id": trace_id,
        "topic": topic,
        "kafka_partition": kafka_partition,
        "kafka_offset": kafka_offset,
        "landed_at": landed_at,
    }


def read_customers_csv(path: str | Path) -> dict[str, dict[str, str]]:
    """customer_id -> the seed row (name, segment, country)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["customer_id"]: row for row in csv.DictReader(handle)}


def event_at(timestamp_ms: int) -> datetime:
    """The envelope timestamp as the timestamptz Postgres derives (exact, no float rounding)."""
    return _EPOCH + timedelta(milliseconds=timestamp_ms)


def landing_key(record: Mapping[str, Any]) -> tuple[Any, str, int, int]:
    return (
        record["landed_at"],
        record["topic"],
        record["kafka_partition"],
        record["kafka_offset"],
    )


def event_order_key(event: Mapping[str, Any]) -> tuple[int, uuid.UUID]:
    return (event["timestamp"], _uuid(event["event_id"]))


def distinct_events(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """event_id (str) -> the winning copy: the first landed."""
    winners: dict[str, Mapping[str, Any]] = {}
    for record in records:
        event_id = str(_uuid(record["event_id"]))
        current = winners.get(event_id)
        if current is None or landing_key(record) < landing_key(current):
            winners[event_id] = record
    return winners


def expected_order_status(
    records: Iterable[Mapping[str, Any]],
    customers: Mapping[str, Mapping[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """The rows of order_status (all columns but updated_at), sorted by order_id.

    `customers` maps customer_id to the seed row (see read_customers_csv); without it customer
    names and segments are None.
    """
    customers = customers or {}
    rows = []
    for order_id, events in sorted(_events_by_order(records).items()):
        latest = max(events, key=event_order_key)
        creations = sorted(
            (event for event in events if event["event_type"] == "OrderCreated"),
            key=event_order_key,
        )
        creation = _typed(creations[0]) if creations else {}
        customer = customers.get(creation.get("customer_id") or "", {})
        row: dict[str, Any] = {
            "order_id": order_id,
            "status": STATUS_BY_EVENT_TYPE[latest["event_type"]],
            "customer_id": creation.get("customer_id"),
            "customer_name": customer.get("name"),
            "customer_segment": customer.get("segment"),
            "order_total": creation.get("order_total"),
            "currency": creation.get("currency"),
            "channel": creation.get("channel"),
        }
        for status, column in MILESTONE_COLUMN.items():
            times = [
                event["timestamp"]
                for event in events
                if STATUS_BY_EVENT_TYPE[event["event_type"]] == status
            ]
            row[column] = event_at(min(times)) if times else None
        row |= {
            "last_event_id": str(_uuid(latest["event_id"])),
            "last_event_type": latest["event_type"],
            "last_event_at": event_at(latest["timestamp"]),
            "last_trace_id": latest.get("trace_id"),
            "event_count": len(events),
        }
        rows.append(row)
    return rows


def expected_order_status_history(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of order_status_history (all columns but updated_at), by order, sequence."""
    rows = []
    for order_id, events in sorted(_events_by_order(records).items()):
        previous = None
        sequence = 0
        for event in sorted(events, key=event_order_key):
            status = STATUS_BY_EVENT_TYPE[event["event_type"]]
            if status == previous:
                continue
            sequence += 1
            rows.append(
                {
                    "order_id": order_id,
                    "event_id": str(_uuid(event["event_id"])),
                    "status": status,
                    "previous_status": previous,
                    "transitioned_at": event_at(event["timestamp"]),
                    "sequence_number": sequence,
                }
            )
            previous = status
    return rows


def expected_conflicts(records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """event_id -> (copies, distinct versions) for the event ids landed in several versions."""
    copies: dict[str, list[str]] = defaultdict(list)
    for record in records:
        copies[str(_uuid(record["event_id"]))].append(_content(record))
    return {
        event_id: (len(contents), len(set(contents)))
        for event_id, contents in copies.items()
        if len(set(contents)) > 1
    }


def _events_by_order(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_order: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for event in distinct_events(records).values():
        by_order[event["aggregate_id"]].append(event)
    return by_order


def _typed(event: Mapping[str, Any]) -> dict[str, Any]:
    """The fields order_status reads from an OrderCreated, upcast to the latest schema."""
    # the library's upcasters, so dbt's SQL upcasting is checked against them
    _, payload = upcast(event["event_type"], event["schema_version"], event["payload"])
    channel = _text(payload.get("channel"))
    return {
        "customer_id": _text(payload.get("customer_id")),
        "order_total": _money(payload.get("order_total")),
        "currency": _text(payload.get("currency")),
        "channel": channel,
    }


def _text(value: Any) -> str | None:
    """jsonb ->> : strings as they are, other JSON values as JSON text, null as None."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _money(value: Any) -> Decimal | None:
    """numeric(12,2) from a JSON number or numeric string, else None (json_numeric macro)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        number = Decimal(repr(value))
    elif isinstance(value, str) and _NUMERIC_STRING.match(value):
        number = Decimal(value.strip())
    else:
        return None
    return number.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _content(record: Mapping[str, Any]) -> str:
    return json.dumps(
        [
            record["event_type"],
            record["aggregate_id"],
            record["timestamp"],
            record["schema_version"],
            record["payload"],
        ],
        sort_keys=True,
    )


def _uuid(value: str | uuid.UUID) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
