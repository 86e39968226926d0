"""Fuzzing the envelope parser: random bytes and near-valid envelopes never crash it, and every
outcome is either a storable event or a rejection with a reason from the fixed set."""

import json
import string
import uuid

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderflow_dagster.land.landing import _Batch
from orderflow_dagster.land.parse import Event, Reason, Rejection, parse_event
from orderflow_dagster.land.ranges import OffsetRange
from tests.support import FakeMessage

MAX = 100_000

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
event_types = st.sampled_from(
    ["OrderCreated", "PaymentProcessed", "ItemShipped", "OrderDelivered", "OrderCancelled", "X"]
)


@st.composite
def near_valid_envelopes(draw):
    env = {
        "event_id": draw(st.one_of(st.just(str(uuid.uuid4())), st.text(max_size=40), json_values)),
        "aggregate_id": draw(st.one_of(st.text(min_size=1, max_size=20), json_values)),
        "event_type": draw(st.one_of(event_types, json_values)),
        "payload": draw(
            st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        k: json_values
                        for k in (
                            "customer_id",
                            "order_total",
                            "currency",
                            "items",
                            "channel",
                            "payment_id",
                            "amount",
                            "method",
                            "shipment_id",
                            "carrier",
                            "tracking_number",
                            "signed_by",
                            "reason",
                        )
                    },
                ),
                json_values,
            )
        ),
        "timestamp": draw(st.one_of(st.integers(min_value=-5, max_value=2**64), json_values)),
        "schema_version": draw(st.one_of(st.integers(min_value=0, max_value=4), json_values)),
    }
    for field in draw(st.sets(st.sampled_from(sorted(env)), max_size=2)):
        del env[field]
    # the standard library writes integers of any size, which is part of what is being fuzzed
    return json.dumps(env).encode()


def assert_well_formed(result):
    if isinstance(result, Rejection):
        assert result.reason in Reason.ALL
        assert result.detail
    else:
        assert isinstance(result, Event)
        assert "\x00" not in result.aggregate_id
        orjson.loads(result.payload_json)


def assert_one_copy_line(value, key, headers):
    batch = _Batch(OffsetRange("t", 0, 0, 10), "run", MAX)
    batch.add(FakeMessage(value, key, headers))
    lines = batch.events + batch.dead
    assert len(lines) == 1
    # one COPY row: exactly one terminating newline, no raw NUL, the right number of columns
    line = lines[0]
    assert line.endswith("\n") and line.count("\n") == 1 and "\x00" not in line
    assert line.count("\t") == (15 if batch.events else 9)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_are_an_event_or_a_reasoned_rejection(raw):
    assert_well_formed(parse_event(raw, max_bytes=MAX))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_envelopes())
def test_near_valid_envelopes_are_an_event_or_a_reasoned_rejection(raw):
    assert_well_formed(parse_event(raw, max_bytes=MAX))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    near_valid_envelopes() | st.binary(max_size=100),
    st.one_of(st.none(), st.binary(max_size=20)),
    st.one_of(
        st.none(),
        st.lists(
            st.tuples(
                st.text(string.printable, max_size=8) | st.text(max_size=8),
                st.none() | st.binary(max_size=20),
            ),
            max_size=3,
        ),
    ),
)
def test_any_record_becomes_exactly_one_well_formed_copy_row(value, key, headers):
    assert_one_copy_line(value, key, headers)
