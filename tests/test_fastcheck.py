"""The generated hot-path payload checks: never more lenient than the JSON Schema they come from."""

from __future__ import annotations

import copy

import fastjsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderflow_dagster.contract import registry
from orderflow_dagster.contract.fastcheck import compile_check, compile_decoder
from orderflow_dagster.ingest.generator import generate

SCHEMA_KEYS = sorted(registry.SCHEMAS)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    # at and beside the contract's bounds
    | st.sampled_from([0, -0.0, 5e-324, 9999999999.99, 9999999999.990002, 10**10, 10**6, 10**6 + 1])
    | st.sampled_from(["", "USD", "usd", "USD\n", "EURO", "x", "ab"])
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["sku", "qty", "unit_price", "x"]), children, max_size=4)
    ),
    max_leaves=8,
)


def valid_payloads() -> dict[tuple[str, int], list[dict]]:
    payloads: dict[tuple[str, int], list[dict]] = {}
    for out in generate(300, seed=3, poison_rate=0, duplicate_rate=0, v2_share=0.5):
        event = orjson.loads(out.value)
        payloads.setdefault((event["event_type"], event["schema_version"]), []).append(
            event["payload"]
        )
    return payloads


VALID = valid_payloads()


def schema_accepts(key: tuple[str, int], payload) -> bool:
    try:
        fastjsonschema.compile(registry.SCHEMAS[key])(payload)
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


def test_every_schema_of_the_registry_gets_a_fast_check():
    assert sorted(registry._FAST_CHECKS) == SCHEMA_KEYS
    assert sorted(registry.RAW_DECODERS) == SCHEMA_KEYS


@pytest.mark.parametrize("key", SCHEMA_KEYS)
def test_the_fast_check_accepts_every_payload_the_producers_generate(key):
    assert VALID.get(key), f"the generator made no {key} payloads"
    check, decode = registry._FAST_CHECKS[key], registry.RAW_DECODERS[key]
    assert all(check(p) for p in VALID[key])
    assert all(decode(orjson.dumps(p)) for p in VALID[key])


@settings(max_examples=400, deadline=None)
@given(
    key=st.sampled_from(SCHEMA_KEYS),
    pick=st.integers(min_value=0, max_value=10**6),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "delete", "set_item"]), st.text(max_size=12), json_values
        ),
        max_size=3,
    ),
)
def test_a_payload_the_fast_paths_accept_satisfies_the_schema(key, pick, edits):
    payload = copy.deepcopy(VALID[key][pick % len(VALID[key])])
    fields = sorted(payload)
    for op, name, value in edits:
        field = fields[len(name) % len(fields)] if fields else name
        if op == "delete":
            payload.pop(field, None)
        elif op == "set_item" and isinstance(payload.get("items"), list) and payload["items"]:
            item = payload["items"][0]
            if isinstance(item, dict):
                item[["sku", "qty", "unit_price"][len(name) % 3]] = value
        else:
            payload[field] = value
    if registry._FAST_CHECKS[key](payload):
        assert schema_accepts(key, payload), payload
    try:
        raw = orjson.dumps(payload)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: orjson cannot write it
        return
    if registry.RAW_DECODERS[key](raw):
        assert schema_accepts(key, orjson.loads(raw)), payload


@pytest.mark.parametrize(
    ("payload", "verdict"),
    [
        ({"n": 1, "s": "AB"}, True),
        ({"n": 0, "s": "AB"}, False),  # below minimum
        ({"n": 1001, "s": "AB"}, False),  # above maximum
        ({"n": 1, "s": "AB", "x": -0.5}, False),  # below minimum
        ({"n": True, "s": "AB"}, False),  # a JSON boolean is not an integer
        ({"n": 2.0, "s": "AB"}, False),  # the schema allows it; the fast check defers to it
        ({"n": 1, "s": "ab"}, False),  # pattern
        ({"n": 1, "s": "AB\n"}, False),  # `$` is the end of the string, as in the schema
        ({"n": 1}, False),  # required
        ({"n": 1, "s": "AB", "tags": ["a", ""]}, False),  # minLength inside items
        ({"n": 1, "s": "AB", "tags": ["a"], "other": None}, True),  # unknown fields are allowed
    ],
)
def test_the_fast_check_follows_each_keyword(payload, verdict):
    check, decode = compile_check(KEYWORDS), compile_decoder(KEYWORDS)
    assert check(payload) is verdict
    # the raw decoder also refuses what it would leave unread: any unknown field
    assert decode(orjson.dumps(payload)) is (verdict and "other" not in payload)


KEYWORDS = {
    "type": "object",
    "required": ["n", "s"],
    "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 1000},
        "s": {"type": "string", "pattern": "^[A-Z]+$"},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "x": {"type": "number", "minimum": 0},
    },
}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"n":1,"s":"AB","x":1e400}', "a number beyond a double (the thorough path's orjson)"),
        (b'{"n":9223372036854775808,"s":"AB"}', "an integer beyond int64"),
        (b'{"n":1,"s":"A\xff"}', "invalid UTF-8"),
        (b'{"n":1,"s":"AB"', "truncated JSON"),
        (b'{"n":1,"s":"AB","other":1}', "an unknown field, which msgspec would skip unread"),
        (b'{"n":1,"s":"AB","tags":[' + b"[" * 2000 + b"]" * 2000 + b"]}", "deep nesting"),
        # numbers whose literal holds more decimals than jsonb's numeric keeps, or may
        (b'{"n":1,"s":"AB","x":0e-99999}', "a zero, whose literal may have any scale"),
        (b'{"n":1,"s":"AB","x":1e-16384}', "a number that reads as zero"),
        (b'{"n":1,"s":"AB","x":0}', "zero, however written"),
        (b'{"n":1,"s":"AB","x":1.' + b"1" * 16400 + b"e-5}", "a payload too long to vouch for"),
    ],
)
def test_the_raw_decoder_refuses_what_it_cannot_vouch_for(raw, why):
    decode = compile_decoder(KEYWORDS)
    assert decode(b'{"n":1,"s":"AB","x":1e300}') is True
    assert decode(raw) is False, why


def test_a_number_the_raw_decoder_cannot_keep_from_zero_gets_no_raw_decoder():
    """Zero's literal may hold any number of decimals; the decoder can refuse it only when zero
    is an end of the field's range (or outside it)."""
    schema = {"type": "object", "properties": {"x": {"type": "number", "minimum": -1}}}
    assert compile_decoder(schema) is None
    assert compile_check(schema)({"x": 0.0}) is True  # parsed payloads are re-encoded: fine
    at_most_zero = {"type": "object", "properties": {"x": {"type": "number", "maximum": 0}}}
    decode = compile_decoder(at_most_zero)
    assert decode(b'{"x":-1.5}') is True
    assert decode(b'{"x":-0.0}') is False and decode(b'{"x":-1e-400}') is False
    above = {"type": "object", "properties": {"x": {"type": "number", "minimum": 0.5}}}
    assert compile_decoder(above)(b'{"x":0.5}') is True


def test_number_bounds_beyond_exact_double_integers_get_no_fast_check():
    # an integer near such a bound compares differently as itself and as its double
    schema = {"type": "object", "properties": {"x": {"type": "number", "maximum": 2**60}}}
    assert compile_check(schema) is None and compile_decoder(schema) is None


def test_a_schema_with_an_unhandled_keyword_gets_no_fast_check():
    assert compile_check({"type": "object", "properties": {"s": {"enum": ["a"]}}}) is None
    assert compile_check({"type": ["string", "null"], "minLength": 1}) is None


def test_a_union_of_types_accepts_each_of_them_and_nothing_else():
    check = compile_check({"type": "object", "properties": {"s": {"type": ["string", "null"]}}})
    assert check({"s": "a"}) and check({"s": None}) and check({})
    assert not check({"s": 1})


def test_property_names_that_are_no_python_names_are_matched_exactly():
    name = "x'); import os; os._exit(3) #"
    schema = {"type": "object", "required": [name], "properties": {name: {"type": "integer"}}}
    check, decode = compile_check(schema), compile_decoder(schema)
    assert check({name: 1}) is True and decode(orjson.dumps({name: 1})) is True
    assert check({}) is False and decode(b"{}") is False
    assert check({"x": 1}) is False and decode(b'{"x":1}') is False
