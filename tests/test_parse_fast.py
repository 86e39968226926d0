"""The envelope parser's fast path never disagrees with its thorough path: whatever it accepts,
the thorough path accepts with the same fields and the same payload value. It accepts every event
the producers generate, and what it refuses the thorough path decides."""

import json
import re
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderflow_dagster.ingest.envelope import new_event
from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.land.landing import EVENT_COLUMNS, _Batch
from orderflow_dagster.land.parse import Event, parse_event, parse_fast, parse_thorough
from orderflow_dagster.land.ranges import OffsetRange
from tests.support import FakeMessage
from tests.test_hostile_numbers import hostile_record

GENERATED = [
    out.value for out in generate(400, seed=11, poison_rate=0, duplicate_rate=0.05, v2_share=0.5)
]
ORDER_CREATED = next(v for v in GENERATED if b'"OrderCreated"' in v and b'"qty":' in v)
FIELDS = ("event_id", "aggregate_id", "event_type", "schema_version", "timestamp_ms", "trace_id")


def same_json(a: str, b: str) -> bool:
    # numbers compared as what both paths can hold: a double, or an exact integer
    return json.loads(a, parse_float=float) == json.loads(b, parse_float=float)


def assert_agrees(raw: bytes) -> Event | None:
    fast = parse_fast(raw)
    if fast is not None:
        thorough = parse_thorough(raw)
        assert isinstance(thorough, Event), (raw, thorough)
        for field in FIELDS:
            assert getattr(fast, field) == getattr(thorough, field), (field, raw)
        assert same_json(fast.payload_json, thorough.payload_json), raw
    return fast


def test_the_fast_path_accepts_every_generated_event_as_the_thorough_path_reads_it():
    for raw in GENERATED:
        assert assert_agrees(raw) is not None, raw


def test_the_fast_path_keeps_the_payload_as_sent():
    raw = (
        b'{"event_id":"0193c0de-0000-7000-8000-000000000001","aggregate_id":"ord-1",'
        b'"event_type":"PaymentProcessed","payload":{"payment_id":"p","amount":10.50,'
        b'"currency":"EUR","method":"card"},"timestamp":1735689600000,"schema_version":1}'
    )
    event = assert_agrees(raw)
    assert event is not None and '"amount":10.50' in event.payload_json


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("an unknown envelope field", lambda s: s[:-1] + ',"source":"pos"}'),
        ("an unknown payload field", lambda s: s.replace('"payload":{', '"payload":{"x":1,', 1)),
        ("a NUL in the payload", lambda s: s.replace('"payload":{', '"payload":{"x":"\\u0000",')),
        ("a number beyond a double", lambda s: s.replace('"payload":{', '"payload":{"x":1e400,')),
        ("a trailing newline in the id", lambda s: re.sub(r'("event_id":"[^"]+)"', r'\1\\n"', s)),
        ("a quantity beyond int64", lambda s: re.sub(r'"qty":\d+', f'"qty":{2**63}', s, count=1)),
        ("a repeated key", lambda s: s[:-1] + ',"event_type":"OrderTeleported"}'),
        ("a float for an integer", lambda s: re.sub(r'"qty":(\d+)', r'"qty":\1.0', s, count=1)),
        (
            "a currency with a final newline",  # Python's `$` would match before it
            lambda s: re.sub(r'"currency":"([A-Z]{3})"', r'"currency":"\1\\n"', s, count=1),
        ),
    ],
)
def test_what_the_fast_path_refuses_the_thorough_path_decides(name, edit):
    base = ORDER_CREATED.decode()
    raw = edit(base).encode()
    assert raw != ORDER_CREATED, name
    assert parse_fast(raw) is None, name
    assert parse_event(raw, max_bytes=1 << 20) == parse_thorough(raw)


def test_a_pretty_printed_payload_becomes_one_copy_row():
    env = json.loads(GENERATED[0])
    raw = json.dumps(env, indent="\t").encode()  # newlines and tabs between the tokens
    event = assert_agrees(raw)
    assert event is not None and "\n" in event.payload_json and "\t" in event.payload_json

    batch = _Batch(OffsetRange("t", 0, 0, 10), "run", 1 << 20)
    batch.add(FakeMessage(raw, env["aggregate_id"].encode()))
    (line,) = batch.events
    assert (
        line.count("\n") == 1
        and line.endswith("\n")
        and line.count("\t") == EVENT_COLUMNS.count(",")
    )


mutated_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(["sku", "qty", "unit_price", "x"]), st.integers(), max_size=3),
)


@st.composite
def mutated_envelopes(draw) -> bytes:
    env = json.loads(draw(st.sampled_from(GENERATED)))
    payload = env["payload"]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        target = draw(st.sampled_from(["envelope", "payload", "item"]))
        if target == "envelope":
            env[draw(st.sampled_from([*env, "trace_id", "extra"]))] = draw(mutated_values)
        elif target == "payload" and isinstance(payload, dict):
            payload[draw(st.sampled_from([*payload, "channel", "extra"]))] = draw(mutated_values)
        elif (
            isinstance(payload, dict)
            and isinstance(payload.get("items"), list)
            and payload["items"]
            and isinstance(payload["items"][0], dict)
        ):
            key = draw(st.sampled_from(["sku", "qty", "unit_price", "x"]))
            payload["items"][0][key] = draw(mutated_values)
    text = json.dumps(
        env, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))
    )
    if draw(st.booleans()) and isinstance(env.get("event_id"), str):
        text = text.replace(env["event_id"], env["event_id"].upper())
    return text.encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_envelopes())
def test_whatever_the_fast_path_accepts_the_thorough_path_accepts_alike(raw):
    assert_agrees(raw)


def test_the_agreement_check_itself_sees_a_different_payload():
    # guards the property above: the comparison must notice a changed number
    assert not same_json('{"a":1.5}', '{"a":1.25}')
    assert same_json('{"a":10.50}', '{"a":10.5}')


def _envelope(event_id: str) -> FakeMessage:
    value = orjson.dumps(new_event("ord-1", "OrderCancelled", {"reason": "r"}, event_id=event_id))
    return FakeMessage(value, b"ord-1")


@pytest.mark.parametrize(
    ("ids", "greatest_landed", "shortcut"),
    [
        (["00000002", "00000003", "00000001"], "00000001", True),  # most above: time-ordered
        (["00000002", "00000001", "00000001"], "00000001", False),  # one of three above
        (["00000003", "00000001"], "00000002", False),  # half is not most
        (["00000001", "00000002"], "00000002", False),  # equal is not above
        (["00000001"], None, True),  # nothing landed yet: every id is above
    ],
)
def test_a_gap_takes_the_audit_shortcut_only_when_most_of_its_ids_are_above_the_greatest_landed(
    ids, greatest_landed, shortcut
):
    """The landing asks audit.log_landing to skip the probe for ids above the greatest landed
    one only when most of the gap's ids are; otherwise the unsorted probe of every row is
    cheaper (random ids). Dead letters do not count."""

    def full(prefix: str) -> str:
        return f"{prefix}-0000-7000-8000-000000000000"

    batch = _Batch(OffsetRange("t", 0, 0, 10), "run", 1 << 20)
    batch.start_gap(full(greatest_landed) if greatest_landed else None)
    for prefix in ids:
        batch.add(_envelope(full(prefix)))
    batch.add(FakeMessage(b"not json"))
    assert len(batch.dead) == 1
    assert batch.gap_mostly_above() is shortcut


# --- hostile numbers: the bounds of the contract, and what jsonb can store -------------------


def number_literals_of(payload_json: str) -> list[str]:
    found: list[str] = []

    def keep(literal: str) -> float:
        found.append(literal)
        return 0.0

    json.loads(payload_json, parse_float=keep, parse_int=keep)
    return found


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=hostile_record())
def test_both_readers_hold_every_number_to_the_contract_and_store_only_what_jsonb_holds(record):
    raw, breaches = record.value, record.breaches
    fast = assert_agrees(raw)
    event = parse_event(raw, max_bytes=1 << 20)
    if not breaches:
        assert isinstance(event, Event), raw[:300]
        # numeric keeps at most 16383 decimals as written (10e-16384 has 16384)
        for literal in number_literals_of(event.payload_json):
            assert Decimal(literal).as_tuple().exponent >= -16383, literal[:80]
        return
    # out of bounds: dead-lettered, whichever reader looked first, naming field and bound
    assert fast is None, raw[:300]
    assert not isinstance(event, Event), raw[:300]
    assert any(b.field in event.detail and b.words in event.detail for b in breaches), (
        event,
        breaches,
    )
