"""A deterministic demo stream of order events, with the faults a real stream has.

`generate()` is pure: the same arguments give the same messages, byte for byte, so a test can
regenerate a stream as its own oracle. Besides well-formed lifecycles it mixes in

* duplicates: an earlier message re-sent byte-identical (a producer retry or a replay), some of
  them onto a *different* partition, so deduplication must work across partitions;
* out-of-order emission: an event arrives after its successor in the lifecycle (its `timestamp`
  is still the true event time; only the emission order changes);
* poison messages: bytes a reader must dead-letter, each tagged with the reason it should get.

Orders arrive every ~30 s of event time while a lifecycle spans seconds to days, so thousands of
orders are open at once and their events interleave. Emission follows event time (a heap merges
the open lifecycles), which keeps memory proportional to the open orders, not the stream.
"""

from __future__ import annotations

import heapq
import itertools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

import orjson

from orderflow_dagster.ingest.envelope import (
    CHANNELS,
    ITEM_SHIPPED,
    ORDER_CANCELLED,
    ORDER_CREATED,
    ORDER_DELIVERED,
    PAYMENT_PROCESSED,
    Event,
    encode,
    new_event,
    uuid7,
)
from orderflow_dagster.ingest.kafka_config import default_partition

Kind = Literal["event", "duplicate", "poison"]

DEFAULT_START_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z: fixed, so output is reproducible
MEAN_ORDER_INTERVAL_MS = 30_000
CUSTOMERS = 500
SKUS = 200
CURRENCIES = ("EUR", "USD", "GBP")
PAYMENT_METHODS = ("card", "paypal", "bank_transfer", "apple_pay")
CARRIERS = {"DHL": "JD", "UPS": "1Z", "FedEx": "FX", "DPD": "DP", "PostNL": "3S"}
SIGNERS = ("A. Jansen", "M. Dubois", "J. Smith", "K. Müller", "L. Rossi", "front desk")
CANCEL_REASONS_UNPAID = ("customer_request", "payment_failed", "fraud_suspected")
CANCEL_REASONS_PAID = ("customer_request", "out_of_stock", "address_invalid")
TRACE_ID_SHARE = 0.25

# Lifecycles and their weights: most orders complete, some are cancelled, some are still open.
_LIFECYCLES: tuple[tuple[tuple[str, ...], int], ...] = (
    ((ORDER_CREATED, PAYMENT_PROCESSED, ITEM_SHIPPED, ORDER_DELIVERED), 55),
    ((ORDER_CREATED, ORDER_CANCELLED), 10),
    ((ORDER_CREATED, PAYMENT_PROCESSED, ORDER_CANCELLED), 7),
    ((ORDER_CREATED,), 8),
    ((ORDER_CREATED, PAYMENT_PROCESSED), 10),
    ((ORDER_CREATED, PAYMENT_PROCESSED, ITEM_SHIPPED), 10),
)
# Event-time gap before each step, in ms (min, max): seconds for payment, days for delivery.
_GAP_MS = {
    PAYMENT_PROCESSED: (2_000, 30 * 60_000),
    ITEM_SHIPPED: (3_600_000, 3 * 86_400_000),
    ORDER_DELIVERED: (12 * 3_600_000, 5 * 86_400_000),
    ORDER_CANCELLED: (60_000, 2 * 86_400_000),
}
# How late an out-of-order event arrives after its successor.
_LATE_MS = (1, 120_000)
# A duplicate is either an immediate producer retry or a replay hours later.
_RETRY_DELAY_MS = (0, 2_000)
_REPLAY_DELAY_MS = (60_000, 6 * 3_600_000)

# poison kind -> the dead-letter reason a reader must give it (the codes of
# orderflow_dagster.land.parse.Reason, documented in docs/dead-letters.md).
POISON_REASONS: dict[str, str] = {
    "invalid_json": "invalid_json",
    "not_an_object": "not_an_object",
    "missing_event_id": "missing_field",
    "invalid_event_id": "invalid_event_id",
    "unknown_event_type": "unknown_event_type",
    "unsupported_schema_version": "unsupported_schema_version",
    "schema_violation": "payload_schema_violation",
    "invalid_utf8": "invalid_json",
    # a raw 0x00 byte inside a JSON string: not valid JSON at all
    "nul_byte": "invalid_json",
    # valid JSON ("\u0000"), but PostgreSQL text and jsonb cannot store it
    "nul_escape": "unstorable_value",
}
POISON_KINDS: tuple[str, ...] = tuple(POISON_REASONS)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One Kafka message to send. `event` is the envelope for events and duplicates (the oracle);
    `partition` is set only when the message must bypass the key partitioner."""

    key: bytes | None
    value: bytes
    partition: int | None
    kind: Kind
    event: Event | None
    poison_reason: str | None = None  # the dead-letter reason expected, for poison only
    poison_kind: str | None = None  # which fault, e.g. "invalid_utf8" (reason "invalid_json")


def unit_price(sku: str) -> Decimal:
    """The fixed price of a SKU (`SKU-0001`..`SKU-0200`), 1.99 to 199.99, from its number."""
    number = int(sku.removeprefix("SKU-"))
    cents = 199 + (number * 7919) % 19_801
    return Decimal(cents) / 100


def order_total(items: list[dict[str, Any]]) -> Decimal:
    """sum(qty * unit_price), rounded to cents: what OrderCreated.order_total must equal."""
    total = sum((Decimal(str(i["unit_price"])) * i["qty"] for i in items), Decimal(0))
    return total.quantize(Decimal("0.01"))


def generate(
    orders: int,
    *,
    seed: int = 0,
    duplicate_rate: float = 0.05,
    cross_partition_duplicate_share: float = 0.5,
    out_of_order_rate: float = 0.1,
    poison_rate: float = 0.01,
    v2_share: float = 0.5,
    start_ms: int = DEFAULT_START_MS,
    num_partitions: int = 4,
    event_id_version: Literal[4, 7] = 7,
) -> Iterator[Outgoing]:
    """The messages for `orders` order lifecycles, in emission order.

    Rates are probabilities per original event: `duplicate_rate` that it is re-sent later,
    `poison_rate` that a poison message follows it; `out_of_order_rate` is per order (with at
    least two events) that one event arrives after its successor. `v2_share` of OrderCreated
    events use schema v2. Cross-partition duplicates go to the partition after the key's own
    (`num_partitions` must match the topic; with 1 partition they cannot cross). Event ids
    are UUIDv7 of the simulated time, as our producer mints them, or random v4 ids as some
    other producers send (`event_id_version=4`).
    """
    if event_id_version not in (4, 7):
        raise ValueError(f"event_id_version must be 4 or 7, got {event_id_version}")
    if orders < 0:
        raise ValueError("orders must be >= 0")
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    rates = {
        "duplicate_rate": duplicate_rate,
        "cross_partition_duplicate_share": cross_partition_duplicate_share,
        "out_of_order_rate": out_of_order_rate,
        "poison_rate": poison_rate,
        "v2_share": v2_share,
    }
    for name, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {rate}")
    stream = _Stream(
        random.Random(seed),
        seed=seed,
        duplicate_rate=duplicate_rate,
        cross_share=cross_partition_duplicate_share,
        out_of_order_rate=out_of_order_rate,
        poison_rate=poison_rate,
        v2_share=v2_share,
        num_partitions=num_partitions,
        event_id_version=event_id_version,
    )
    return stream.run(orders, start_ms)


class _Stream:
    """The mutable state of one generation: the rng, the pending-message heap, counters."""

    def __init__(
        self,
        rng: random.Random,
        *,
        seed: int,
        duplicate_rate: float,
        cross_share: float,
        out_of_order_rate: float,
        poison_rate: float,
        v2_share: float,
        num_partitions: int,
        event_id_version: int = 7,
    ) -> None:
        self.rng = rng
        self.event_id_version = event_id_version
        self.seed = seed
        self.duplicate_rate = duplicate_rate
        self.cross_share = cross_share
        self.out_of_order_rate = out_of_order_rate
        self.poison_rate = poison_rate
        self.v2_share = v2_share
        self.num_partitions = num_partitions
        # (emit_ms, sequence, message): the sequence breaks ties in insertion order.
        self.pending: list[tuple[int, int, Outgoing]] = []
        self.sequence = itertools.count()
        # Round-robin from a seeded start: every kind appears once there are enough poisons.
        self.next_poison = rng.randrange(len(POISON_KINDS))

    def run(self, orders: int, start_ms: int) -> Iterator[Outgoing]:
        created_ms = start_ms
        for index in range(orders):
            created_ms += 1 + int(self.rng.expovariate(1 / MEAN_ORDER_INTERVAL_MS))
            # Everything due before this order exists is emitted first.
            yield from self._emit_until(created_ms)
            self._schedule_order(f"ord-s{self.seed}-{index:07d}", created_ms)
        yield from self._emit_until(None)

    def _emit_until(self, limit_ms: int | None) -> Iterator[Outgoing]:
        while self.pending and (limit_ms is None or self.pending[0][0] < limit_ms):
            emit_ms, _, message = heapq.heappop(self.pending)
            yield message
            if message.kind == "event":
                yield from self._after_event(emit_ms, message)

    def _push(self, emit_ms: int, message: Outgoing) -> None:
        heapq.heappush(self.pending, (emit_ms, next(self.sequence), message))

    def _after_event(self, emit_ms: int, message: Outgoing) -> Iterator[Outgoing]:
        if self.rng.random() < self.duplicate_rate:
            self._schedule_duplicate(emit_ms, message)
        if self.rng.random() < self.poison_rate:
            assert message.event is not None
            yield self._poison(message.event)

    # -- lifecycles ------------------------------------------------------------------------------

    def _schedule_order(self, aggregate_id: str, created_ms: int) -> None:
        steps = self.rng.choices([s for s, _ in _LIFECYCLES], [w for _, w in _LIFECYCLES])[0]
        events = self._lifecycle(aggregate_id, created_ms, steps)
        emit_at = [event["timestamp"] for event in events]
        if len(events) > 1 and self.rng.random() < self.out_of_order_rate:
            # One event arrives late, after its successor (a slow service, a retry after a
            # timeout). Event time is untouched: only arrival order breaks.
            late = self.rng.randrange(len(events) - 1)
            emit_at[late] = events[late + 1]["timestamp"] + self.rng.randint(*_LATE_MS)
        for event, emit_ms in zip(events, emit_at, strict=True):
            key, value = encode(event)
            self._push(emit_ms, Outgoing(key, value, None, "event", event))

    def _lifecycle(self, aggregate_id: str, created_ms: int, steps: tuple[str, ...]) -> list[Event]:
        created = self._order_created(aggregate_id, created_ms)
        events = [created]
        timestamp = created_ms
        for event_type in steps[1:]:
            timestamp += self.rng.randint(*_GAP_MS[event_type])
            paid = PAYMENT_PROCESSED in [e["event_type"] for e in events]
            payload = self._payload(event_type, created["payload"], paid)
            events.append(self._event(aggregate_id, event_type, payload, timestamp))
        return events

    def _event(
        self,
        aggregate_id: str,
        event_type: str,
        payload: dict[str, Any],
        timestamp_ms: int,
        schema_version: int = 1,
    ) -> Event:
        trace_id = self._hex(128) if self.rng.random() < TRACE_ID_SHARE else None
        return new_event(
            aggregate_id,
            event_type,
            payload,
            event_id=self._uuid(timestamp_ms),
            timestamp_ms=timestamp_ms,
            schema_version=schema_version,
            trace_id=trace_id,
        )

    def _order_created(self, aggregate_id: str, created_ms: int) -> Event:
        payload = self._created_payload()
        version = 1
        if self.rng.random() < self.v2_share:
            payload["channel"] = self.rng.choice(CHANNELS)
            version = 2
        return self._event(aggregate_id, ORDER_CREATED, payload, created_ms, version)

    def _created_payload(self) -> dict[str, Any]:
        rng = self.rng
        skus = rng.sample(range(1, SKUS + 1), rng.randint(1, 4))
        items = [
            {"sku": sku, "qty": rng.randint(1, 5), "unit_price": float(unit_price(sku))}
            for sku in (f"SKU-{n:04d}" for n in skus)
        ]
        return {
            "customer_id": f"cust-{rng.randint(1, CUSTOMERS):04d}",
            "order_total": float(order_total(items)),
            "currency": rng.choice(CURRENCIES),
            "items": items,
        }

    def _payload(self, event_type: str, order: dict[str, Any], paid: bool) -> dict[str, Any]:
        rng = self.rng
        if event_type == PAYMENT_PROCESSED:
            return {
                "payment_id": f"pay-{self._hex(64)}",
                "amount": order["order_total"],
                "currency": order["currency"],
                "method": rng.choice(PAYMENT_METHODS),
            }
        if event_type == ITEM_SHIPPED:
            carrier = rng.choice(list(CARRIERS))
            return {
                "shipment_id": f"shp-{self._hex(48)}",
                "carrier": carrier,
                "tracking_number": CARRIERS[carrier] + f"{rng.getrandbits(40):013d}",
            }
        if event_type == ORDER_DELIVERED:
            return {"signed_by": rng.choice(SIGNERS) if rng.random() < 0.75 else None}
        if event_type == ORDER_CANCELLED:
            return {"reason": rng.choice(CANCEL_REASONS_PAID if paid else CANCEL_REASONS_UNPAID)}
        raise ValueError(f"no payload rule for {event_type}")

    # -- duplicates ------------------------------------------------------------------------------

    def _schedule_duplicate(self, emit_ms: int, original: Outgoing) -> None:
        retry = self.rng.random() < 0.5
        delay = self.rng.randint(*(_RETRY_DELAY_MS if retry else _REPLAY_DELAY_MS))
        partition = None
        if self.rng.random() < self.cross_share and original.key:
            # Same bytes, pinned to the partition after the key's own: a replay tool or a
            # re-partitioned topic delivering the event again somewhere else.
            partition = (default_partition(original.key, self.num_partitions) + 1) % (
                self.num_partitions
            )
        self._push(emit_ms + delay, replace(original, kind="duplicate", partition=partition))

    # -- poison ----------------------------------------------------------------------------------

    def _poison(self, related: Event) -> Outgoing:
        kind = POISON_KINDS[self.next_poison]
        self.next_poison = (self.next_poison + 1) % len(POISON_KINDS)
        value = _POISON_BUILDERS[kind](self, related)
        # Keyed like the order it corrupts, so it lands on that order's partition.
        key = related["aggregate_id"].encode()
        return Outgoing(key, value, None, "poison", None, POISON_REASONS[kind], kind)

    def _envelope(self, related: Event, **overrides: Any) -> dict[str, Any]:
        """A plausible envelope about the related order (fresh id, so it collides with nothing)."""
        envelope = {
            "event_id": self._uuid(related["timestamp"]),
            "aggregate_id": related["aggregate_id"],
            "event_type": related["event_type"],
            "payload": related["payload"],
            "timestamp": related["timestamp"],
            "schema_version": related["schema_version"],
        }
        envelope.update(overrides)
        return envelope

    def _uuid(self, timestamp_ms: int) -> str:
        # a UUIDv7 of the simulated time, as a producer would mint it; seeded, so reproducible
        if self.event_id_version == 4:
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        return str(uuid7(timestamp_ms, self.rng.getrandbits(74)))

    def _hex(self, bits: int) -> str:
        return f"{self.rng.getrandbits(bits):0{bits // 4}x}"


def _invalid_json(stream: _Stream, related: Event) -> bytes:
    whole = orjson.dumps(stream._envelope(related))
    return whole[: len(whole) // 2]  # cut mid-document, as a truncated write would


def _not_an_object(stream: _Stream, related: Event) -> bytes:
    return orjson.dumps([stream._envelope(related)])


def _missing_event_id(stream: _Stream, related: Event) -> bytes:
    envelope = stream._envelope(related)
    del envelope["event_id"]
    return orjson.dumps(envelope)


def _invalid_event_id(stream: _Stream, related: Event) -> bytes:
    return orjson.dumps(stream._envelope(related, event_id=f"evt-{stream._hex(32)}"))


def _unknown_event_type(stream: _Stream, related: Event) -> bytes:
    envelope = stream._envelope(related, event_type="OrderRefunded", schema_version=1)
    envelope["payload"] = {"refund_id": f"ref-{stream._hex(48)}", "amount": 1.0}
    return orjson.dumps(envelope)


def _unsupported_schema_version(stream: _Stream, related: Event) -> bytes:
    return orjson.dumps(stream._envelope(related, schema_version=99))


def _schema_violation(stream: _Stream, related: Event) -> bytes:
    payload = stream._created_payload()
    payload["order_total"] = f"{payload['order_total']:.2f}"  # a string, not a number
    envelope = stream._envelope(
        related, event_type=ORDER_CREATED, schema_version=1, payload=payload
    )
    return orjson.dumps(envelope)


def _invalid_utf8(stream: _Stream, related: Event) -> bytes:
    return _inject_into_aggregate_id(orjson.dumps(stream._envelope(related)), b"\xff\xfe")


def _nul_byte(stream: _Stream, related: Event) -> bytes:
    return _inject_into_aggregate_id(orjson.dumps(stream._envelope(related)), b"\x00")


def _nul_escape(stream: _Stream, related: Event) -> bytes:
    envelope = stream._envelope(related, event_type=ORDER_CANCELLED, schema_version=1)
    envelope["payload"] = {"reason": "customer_request\x00"}  # orjson writes it as \u0000
    return orjson.dumps(envelope)


def _inject_into_aggregate_id(value: bytes, raw: bytes) -> bytes:
    marker = b'"aggregate_id":"'
    return value.replace(marker, marker + raw, 1)


_POISON_BUILDERS = {
    "invalid_json": _invalid_json,
    "not_an_object": _not_an_object,
    "missing_event_id": _missing_event_id,
    "invalid_event_id": _invalid_event_id,
    "unknown_event_type": _unknown_event_type,
    "unsupported_schema_version": _unsupported_schema_version,
    "schema_violation": _schema_violation,
    "invalid_utf8": _invalid_utf8,
    "nul_byte": _nul_byte,
    "nul_escape": _nul_escape,
}
assert set(_POISON_BUILDERS) == set(POISON_REASONS)
