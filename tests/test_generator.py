"""The demo stream generator: deterministic, and faulty in exactly the documented ways."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter, defaultdict
from decimal import Decimal

import orjson
import pytest

from orderflow_dagster.ingest.envelope import (
    CHANNELS,
    CURRENT_SCHEMA_VERSION,
    EVENT_TYPES,
    ORDER_CREATED,
    PAYMENT_PROCESSED,
)
from orderflow_dagster.ingest.generator import (
    POISON_KINDS,
    POISON_REASONS,
    Outgoing,
    generate,
    order_total,
    unit_price,
)
from orderflow_dagster.ingest.kafka_config import default_partition

LIFECYCLE_RANK = {
    "OrderCreated": 0,
    "PaymentProcessed": 1,
    "ItemShipped": 2,
    "OrderDelivered": 3,
    "OrderCancelled": 3,
}


@pytest.fixture(scope="module")
def stream() -> list[Outgoing]:
    return list(generate(3000, seed=42))


def of_kind(stream: list[Outgoing], kind: str) -> list[Outgoing]:
    return [m for m in stream if m.kind == kind]


def test_same_seed_gives_the_same_bytes() -> None:
    first = list(generate(300, seed=5))
    second = list(generate(300, seed=5))
    assert first == second


def test_different_seeds_give_different_streams() -> None:
    assert [m.value for m in generate(50, seed=1)] != [m.value for m in generate(50, seed=2)]


def test_every_order_starts_with_one_order_created(stream: list[Outgoing]) -> None:
    per_order = Counter(m.event["aggregate_id"] for m in of_kind(stream, "event"))
    created = Counter(
        m.event["aggregate_id"]
        for m in of_kind(stream, "event")
        if m.event["event_type"] == ORDER_CREATED
    )
    assert len(created) == 3000
    assert set(per_order) == set(created)
    assert all(count == 1 for count in created.values())


def test_event_ids_are_unique_uuids(stream: list[Outgoing]) -> None:
    ids = [m.event["event_id"] for m in of_kind(stream, "event")]
    assert len(ids) == len(set(ids))
    for event_id in ids[:500]:
        assert str(uuid.UUID(event_id)) == event_id


def test_event_ids_are_uuidv7_of_the_event_time(stream: list[Outgoing]) -> None:
    for message in of_kind(stream, "event")[:500]:
        event_id = uuid.UUID(message.event["event_id"])
        assert event_id.version == 7
        assert event_id.int >> 80 == message.event["timestamp"]


def test_event_ids_can_be_random_v4_as_other_producers_send_them() -> None:
    ids = [
        m.event["event_id"]
        for m in of_kind(list(generate(50, seed=1, event_id_version=4)), "event")
    ]
    assert ids and all(uuid.UUID(i).version == 4 for i in ids)
    with pytest.raises(ValueError, match="event_id_version"):
        list(generate(1, event_id_version=5))


def test_events_are_keyed_by_aggregate_id(stream: list[Outgoing]) -> None:
    for message in of_kind(stream, "event"):
        assert message.key == message.event["aggregate_id"].encode()
        assert orjson.loads(message.value) == message.event
        assert message.partition is None


def test_duplicates_are_byte_identical_to_an_earlier_event(stream: list[Outgoing]) -> None:
    sent: dict[str, bytes] = {}
    duplicates = 0
    for message in stream:
        if message.kind == "event":
            sent[message.event["event_id"]] = message.value
        elif message.kind == "duplicate":
            duplicates += 1
            assert sent[message.event["event_id"]] == message.value
    assert duplicates > 0


def test_duplicate_rate_is_roughly_respected(stream: list[Outgoing]) -> None:
    ratio = len(of_kind(stream, "duplicate")) / len(of_kind(stream, "event"))
    assert 0.04 < ratio < 0.06


def test_some_duplicates_target_another_partition(stream: list[Outgoing]) -> None:
    duplicates = of_kind(stream, "duplicate")
    crossing = [m for m in duplicates if m.partition is not None]
    assert 0.35 < len(crossing) / len(duplicates) < 0.65
    for message in crossing:
        own = default_partition(message.key, 4)
        assert message.partition == (own + 1) % 4 != own


def test_cross_partition_duplicates_follow_the_topic_partition_count() -> None:
    crossing = [
        m for m in generate(500, seed=3, num_partitions=7, duplicate_rate=0.3) if m.partition
    ]
    assert crossing
    for message in crossing:
        assert message.partition == (default_partition(message.key, 7) + 1) % 7


def test_out_of_order_lifecycles_exist_but_event_time_follows_the_lifecycle(
    stream: list[Outgoing],
) -> None:
    lifecycles: dict[str, list[dict]] = defaultdict(list)
    for message in of_kind(stream, "event"):
        lifecycles[message.event["aggregate_id"]].append(message.event)
    reordered = 0
    for events in lifecycles.values():
        by_time = sorted(events, key=lambda e: e["timestamp"])
        ranks = [LIFECYCLE_RANK[e["event_type"]] for e in by_time]
        assert ranks == sorted(ranks)
        times = [e["timestamp"] for e in by_time]
        assert len(set(times)) == len(times)  # strictly increasing
        if events != by_time:
            reordered += 1
    multi_event_orders = sum(1 for events in lifecycles.values() if len(events) > 1)
    assert 0.07 < reordered / multi_event_orders < 0.13


def test_orders_interleave(stream: list[Outgoing]) -> None:
    # Many orders open at once: between an order's first and last event, others' events arrive.
    order_of_first = [m.event["aggregate_id"] for m in of_kind(stream, "event")][:200]
    switches = sum(1 for a, b in itertools.pairwise(order_of_first) if a != b)
    assert switches > 150
    positions: dict[str, list[int]] = defaultdict(list)
    for index, message in enumerate(of_kind(stream, "event")):
        positions[message.event["aggregate_id"]].append(index)
    spans = [p[-1] - p[0] for p in positions.values() if len(p) > 1]
    assert sorted(spans)[len(spans) // 2] > 100


def test_every_poison_kind_appears_with_its_reason(stream: list[Outgoing]) -> None:
    poison = of_kind(stream, "poison")
    assert Counter(m.poison_kind for m in poison).keys() == set(POISON_KINDS)
    for message in poison:
        assert message.poison_reason == POISON_REASONS[message.poison_kind]
        assert message.event is None


def test_poison_messages_are_really_broken(stream: list[Outgoing]) -> None:
    for message in of_kind(stream, "poison"):
        kind, value = message.poison_kind, message.value
        if kind in ("invalid_json", "invalid_utf8", "nul_byte"):
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(value)
            continue
        envelope = orjson.loads(value)
        if kind == "not_an_object":
            assert isinstance(envelope, list)
        elif kind == "missing_event_id":
            assert "event_id" not in envelope
        elif kind == "invalid_event_id":
            with pytest.raises(ValueError):
                uuid.UUID(envelope["event_id"])
        elif kind == "unknown_event_type":
            assert envelope["event_type"] not in EVENT_TYPES
        elif kind == "unsupported_schema_version":
            assert envelope["schema_version"] > CURRENT_SCHEMA_VERSION[envelope["event_type"]]
        elif kind == "schema_violation":
            assert isinstance(envelope["payload"]["order_total"], str)
        elif kind == "nul_escape":
            assert b"\\u0000" in value and "\x00" in envelope["payload"]["reason"]
    assert any(b"\x00" in m.value for m in stream if m.poison_kind == "nul_byte")


def test_poison_reasons_match_the_landing_parser(stream: list[Outgoing]) -> None:
    parse = pytest.importorskip("orderflow_dagster.land.parse")
    for message in stream:
        result = parse.parse_event(message.value, max_bytes=1 << 20)
        if message.kind == "poison":
            assert isinstance(result, parse.Rejection), message.poison_kind
            assert result.reason == message.poison_reason, (message.poison_kind, result)
        else:
            assert not isinstance(result, parse.Rejection), result


def test_poison_rate_is_roughly_respected(stream: list[Outgoing]) -> None:
    ratio = len(of_kind(stream, "poison")) / len(of_kind(stream, "event"))
    assert 0.006 < ratio < 0.014


def test_v2_share_is_roughly_respected(stream: list[Outgoing]) -> None:
    created = [m.event for m in of_kind(stream, "event") if m.event["event_type"] == ORDER_CREATED]
    v2 = [e for e in created if e["schema_version"] == 2]
    assert 0.45 < len(v2) / len(created) < 0.55
    assert all(e["payload"]["channel"] in CHANNELS for e in v2)
    assert all("channel" not in e["payload"] for e in created if e["schema_version"] == 1)


def test_v2_share_extremes() -> None:
    versions = {
        share: {
            m.event["schema_version"]
            for m in generate(100, seed=1, v2_share=share)
            if m.kind == "event" and m.event["event_type"] == ORDER_CREATED
        }
        for share in (0.0, 1.0)
    }
    assert versions == {0.0: {1}, 1.0: {2}}


def test_every_order_total_equals_its_items(stream: list[Outgoing]) -> None:
    for message in of_kind(stream, "event"):
        if message.event["event_type"] != ORDER_CREATED:
            continue
        payload = message.event["payload"]
        expected = sum(
            (Decimal(str(i["unit_price"])) * i["qty"] for i in payload["items"]), Decimal(0)
        ).quantize(Decimal("0.01"))
        assert Decimal(str(payload["order_total"])) == expected
        for item in payload["items"]:
            assert Decimal(str(item["unit_price"])) == unit_price(item["sku"])


def test_payment_amount_equals_order_total(stream: list[Outgoing]) -> None:
    totals: dict[str, tuple[float, str]] = {}
    for message in of_kind(stream, "event"):
        event = message.event
        if event["event_type"] == ORDER_CREATED:
            totals[event["aggregate_id"]] = (
                event["payload"]["order_total"],
                event["payload"]["currency"],
            )
    payments = [
        m.event for m in of_kind(stream, "event") if m.event["event_type"] == PAYMENT_PROCESSED
    ]
    assert payments
    for payment in payments:
        amount, currency = totals[payment["aggregate_id"]]
        assert (payment["payload"]["amount"], payment["payload"]["currency"]) == (amount, currency)


def test_unit_prices_are_fixed_per_sku() -> None:
    assert unit_price("SKU-0001") == unit_price("SKU-0001")
    prices = {unit_price(f"SKU-{n:04d}") for n in range(1, 201)}
    assert len(prices) > 150
    assert all(Decimal("1.99") <= p <= Decimal("199.99") for p in prices)
    assert order_total([{"sku": "x", "qty": 3, "unit_price": 19.99}]) == Decimal("59.97")


def test_zero_rates_give_a_clean_stream() -> None:
    messages = list(generate(200, seed=9, duplicate_rate=0, out_of_order_rate=0, poison_rate=0))
    assert {m.kind for m in messages} == {"event"}
    last_seen: dict[str, int] = {}
    for message in messages:
        aggregate, timestamp = message.event["aggregate_id"], message.event["timestamp"]
        assert timestamp > last_seen.get(aggregate, -1)
        last_seen[aggregate] = timestamp


@pytest.mark.parametrize(
    "kwargs",
    [{"orders": -1}, {"orders": 1, "duplicate_rate": 1.5}, {"orders": 1, "num_partitions": 0}],
)
def test_invalid_arguments_are_rejected_eagerly(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(**kwargs)
