"""The event envelope every producer writes to `orders.events` (see docs/event-contract.md).

Only construction and encoding live here; parsing and validation belong to the readers, which
must also accept older schema versions and ignore fields they do not know.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import orjson

ORDER_CREATED = "OrderCreated"
PAYMENT_PROCESSED = "PaymentProcessed"
ITEM_SHIPPED = "ItemShipped"
ORDER_DELIVERED = "OrderDelivered"
ORDER_CANCELLED = "OrderCancelled"

EVENT_TYPES: tuple[str, ...] = (
    ORDER_CREATED,
    PAYMENT_PROCESSED,
    ITEM_SHIPPED,
    ORDER_DELIVERED,
    ORDER_CANCELLED,
)
# OrderCreated v2 added `channel`; v1 readers' upcast default is DEFAULT_CHANNEL.
CURRENT_SCHEMA_VERSION: dict[str, int] = {t: 1 for t in EVENT_TYPES} | {ORDER_CREATED: 2}
CHANNELS: tuple[str, ...] = ("web", "mobile", "store", "marketplace")
DEFAULT_CHANNEL = "web"

Event = dict[str, Any]


def uuid7(timestamp_ms: int, rand74: int) -> uuid.UUID:
    """An RFC 9562 version-7 UUID: the Unix time in ms in the top 48 bits, then 74 random bits.

    Ids minted in time order sort in time order, so every index on event_id (the landing's
    duplicate check, the marts' keys) takes new ids near its right edge, in pages already in
    memory, instead of at a random leaf. The readers accept any UUID.
    """
    if not 0 <= timestamp_ms < 1 << 48:
        raise ValueError(f"timestamp_ms {timestamp_ms} does not fit the 48 bits of a UUIDv7")
    rand_a, rand_b = (rand74 >> 62) & 0xFFF, rand74 & ((1 << 62) - 1)
    return uuid.UUID(int=timestamp_ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)


def new_event_id(timestamp_ms: int | None = None) -> str:
    """A fresh event_id: a UUIDv7 for the given (or the current) time."""
    ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return str(uuid7(ms, int.from_bytes(os.urandom(10)) >> 6))


def new_event(
    aggregate_id: str,
    event_type: str,
    payload: dict[str, Any],
    *,
    event_id: str | None = None,
    timestamp_ms: int | None = None,
    schema_version: int = 1,
    trace_id: str | None = None,
) -> Event:
    """A contract-conforming envelope. A fresh `event_id` (a UUIDv7) unless one is given: a caller
    retrying a send must pass the first attempt's id so readers can drop the duplicate."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event_type {event_type!r}; expected one of {EVENT_TYPES}")
    if not 1 <= schema_version <= CURRENT_SCHEMA_VERSION[event_type]:
        raise ValueError(
            f"{event_type} has schema versions 1..{CURRENT_SCHEMA_VERSION[event_type]}, "
            f"got {schema_version}"
        )
    if not aggregate_id:
        raise ValueError("aggregate_id must be a non-empty string")
    event: Event = {
        # Normalised through UUID so a malformed id fails here, not in a reader's dead letters.
        "event_id": str(uuid.UUID(event_id)) if event_id is not None else new_event_id(),
        "aggregate_id": aggregate_id,
        "event_type": event_type,
        "payload": payload,
        "timestamp": int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms),
        "schema_version": schema_version,
    }
    if trace_id is not None:
        event["trace_id"] = trace_id
    return event


def encode(event: Event) -> tuple[bytes, bytes]:
    """(key, value) for Kafka: the key is the aggregate id so one order stays on one partition
    (Kafka orders per partition only)."""
    return event["aggregate_id"].encode("utf-8"), orjson.dumps(event)
