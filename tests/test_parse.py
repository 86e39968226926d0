"""Envelope validation and COPY escaping: pure unit tests."""

import json
import uuid

import orjson
import pytest

from orderflow_dagster.land.parse import Event, Reason, Rejection, copy_json, copy_text, parse_event

MAX = 1_048_576


def envelope(**overrides):
    env = {
        "event_id": str(uuid.uuid4()),
        "aggregate_id": "order-1",
        "event_type": "PaymentProcessed",
        "payload": {"payment_id": "p1", "amount": 10.5, "currency": "EUR", "method": "card"},
        "timestamp": 1_700_000_000_000,
        "schema_version": 1,
    }
    env.update(overrides)
    return orjson.dumps(env)


def test_a_valid_envelope_parses_into_typed_fields():
    event = parse_event(envelope(), max_bytes=MAX)
    assert isinstance(event, Event)
    assert event.event_type == "PaymentProcessed" and event.timestamp_ms == 1_700_000_000_000
    assert orjson.loads(event.payload_json)["amount"] == 10.5


def test_unknown_fields_are_ignored_by_readers():
    raw = envelope(
        extra_top="x",
        payload={
            "payment_id": "p",
            "amount": 1,
            "currency": "EUR",
            "method": "card",
            "new_field": [1, 2],
        },
    )
    assert isinstance(parse_event(raw, max_bytes=MAX), Event)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", Reason.INVALID_JSON),
        (b"\xff\xfe garbage", Reason.INVALID_JSON),
        (b"", Reason.INVALID_JSON),
        (b"[1, 2]", Reason.NOT_AN_OBJECT),
        (orjson.dumps({"event_id": str(uuid.uuid4())}), Reason.MISSING_FIELD),
        (envelope(event_id="not-a-uuid"), Reason.INVALID_EVENT_ID),
        (envelope(event_type="OrderTeleported"), Reason.UNKNOWN_EVENT_TYPE),
        (envelope(schema_version=99), Reason.UNSUPPORTED_SCHEMA_VERSION),
        (envelope(payload={"payment_id": "p"}), Reason.PAYLOAD_SCHEMA_VIOLATION),
        (
            envelope(
                payload={"payment_id": "p", "amount": "ten", "currency": "EUR", "method": "card"}
            ),
            Reason.PAYLOAD_SCHEMA_VIOLATION,
        ),
        (envelope(timestamp="yesterday"), Reason.INVALID_FIELD),
        (envelope(aggregate_id=""), Reason.INVALID_FIELD),
        (
            envelope(
                payload={"payment_id": "p\u0000", "amount": 1, "currency": "EUR", "method": "card"}
            ),
            Reason.UNSTORABLE_VALUE,
        ),
        (b"{" + b" " * 2000 + b"}", Reason.OVERSIZE),
    ],
)
def test_each_kind_of_poison_gets_its_reason(raw, reason):
    result = parse_event(raw, max_bytes=1000 if reason == Reason.OVERSIZE else MAX)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail


def test_an_escaped_backslash_before_u0000_is_not_mistaken_for_a_nul():
    raw = envelope(
        payload={"payment_id": "\\u0000", "amount": 1, "currency": "EUR", "method": "card"}
    )
    assert isinstance(parse_event(raw, max_bytes=MAX), Event)


def test_copy_text_escapes_the_characters_copy_treats_specially():
    assert copy_text("a\tb\nc\\d\re") == "a\\tb\\nc\\\\d\\re"
    assert copy_text(None) == "\\N"
    assert copy_json('{"a":"x\\"y"}') == '{"a":"x\\\\"y"}'
    # a pretty-printed payload: the whitespace between tokens is escaped too
    assert copy_json('{\n\t"a": 1\r}') == '{\\n\\t"a": 1\\r}'
    # other unprintable characters are no concern of COPY and stay as they are
    assert copy_text("注文 \u2028 \x01") == "注文 \u2028 \x01"


@pytest.mark.parametrize(
    "big", [123456789012345678901234567890, 2**64, 2**64 + 1, -(2**63) - 1, 2**64 - 1, -(2**63)]
)
def test_integers_at_and_beyond_64_bits_are_kept_exactly(big):
    env = orjson.loads(envelope())
    # in fields the schema does not know: its money fields are bounded far below
    env["payload"] |= {"order_ref": big, "ref": -big}
    raw = json.dumps(env).encode()  # orjson itself refuses to write such integers
    event = parse_event(raw, max_bytes=MAX)
    assert isinstance(event, Event)
    assert f'"order_ref":{big}' in event.payload_json and f'"ref":{-big}' in event.payload_json


def test_hex_strings_that_look_like_exponents_are_kept_as_they_are():
    env = orjson.loads(envelope())
    env["payload"] |= {"payment_id": "1e5-2E+3-9e-1", "tiny": 2.5e-7, "large": 1.5e300}
    event = parse_event(orjson.dumps(env), max_bytes=MAX)
    assert isinstance(event, Event)
    assert orjson.loads(event.payload_json) == env["payload"]


def test_a_number_beyond_double_range_is_dead_lettered_as_invalid_json():
    raw = envelope().replace(b'"amount":10.5', b'"amount":1e400')
    result = parse_event(raw, max_bytes=MAX)
    assert isinstance(result, Rejection) and result.reason == Reason.INVALID_JSON


def test_duplicate_json_keys_keep_the_last_value_like_jsonb():
    raw = envelope().replace(b'"method":"card"', b'"method":"card","method":"cash"')
    event = parse_event(raw, max_bytes=MAX)
    assert isinstance(event, Event) and orjson.loads(event.payload_json)["method"] == "cash"
