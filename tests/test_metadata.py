"""A record's metadata (headers, key, trace context) never fails its range and is stored exactly.

Pure tests of the encoding and of the traceparent parser, then records with hostile metadata
through the real broker, the real landing, Postgres and dbt.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from pathlib import Path

import orjson
import psycopg
import psycopg.sql
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land import metadata, store
from orderflow_dagster.land.landing import _Batch, land_range
from orderflow_dagster.land.parse import Reason
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import OffsetRange
from orderflow_dagster.serve.dlq import replay
from orderflow_dagster.stack import manager
from orderflow_dagster.transform.dbt import run_dbt_build
from tests.raw_producer import RawProducer
from tests.support import FakeMessage, invariants
from tests.test_landing import connections, land_all

REPO = Path(__file__).resolve().parents[1]

# --- an independent statement of the W3C rule, to check the parser against ---------------------

# version (2 lowercase hex, not ff) - trace-id (32, not all zero) - parent-id (16, not all zero)
# - flags (2); a later version may add fields after a dash, version 00 has exactly these four
_W3C = re.compile(
    rb"(?!ff)([0-9a-f]{2})-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-.*)?",
    re.DOTALL,
)


def w3c_trace_id(value: bytes | None) -> str | None:
    match = _W3C.fullmatch(value) if value is not None else None
    if match is None or (match[1] == b"00" and match[3] is not None):
        return None
    return match[2].decode()


def expected_trace(envelope_trace: str | None, headers) -> tuple[str | None, bool]:
    """(trace id, whether a traceparent was dropped) for a record the client delivered."""
    if envelope_trace is not None:
        return envelope_trace, False
    values = [v for k, v in headers or () if k == "traceparent"]
    if not values:
        return None, False
    found = {w3c_trace_id(v) for v in values}
    if None in found or len(found) > 1:
        return None, True
    return found.pop(), False


DROP_REASON = re.compile(
    r"traceparent dropped: (?:header \d+ of \d+ named traceparent: )?(?:the header has no value"
    r"|version is not 2 lowercase hex|version ff is invalid"
    r"|version 00 is not exactly 55 characters|shorter than 55 characters"
    r"|fields are not separated by '-'|trace-id is not 32 lowercase hex|trace-id is all zeros"
    r"|parent-id is not 16 lowercase hex|parent-id is all zeros"
    r"|trace-flags is not 2 lowercase hex|trace-flags is not followed by '-')"
    r"|traceparent dropped: \d+ traceparent headers name different trace ids"
)

# --- strategies -------------------------------------------------------------------------------


def _hex(n: int):
    return st.text("0123456789abcdef", min_size=n, max_size=n)


@st.composite
def traceparents(draw) -> bytes | None:
    """Well-formed traceparents of any version, and near misses of every kind."""
    version = draw(st.sampled_from(["00", "00", "00", "01", "7f", "fe"]) | _hex(2))
    value = f"{version}-{draw(_hex(32))}-{draw(_hex(16))}-{draw(_hex(2))}".encode()
    if draw(st.integers(0, 3)) == 0:
        value += draw(st.sampled_from([b"-", b"", b"x"])) + draw(st.binary(max_size=8))
    mutation = draw(
        st.sampled_from(
            [None] * 6
            + ["byte", "truncate", "upper", "zero-trace", "zero-parent", "nul", "ff", "any"]
        )
    )
    if mutation == "byte":
        at = draw(st.integers(0, len(value) - 1))
        value = value[:at] + bytes([draw(st.integers(0, 255))]) + value[at + 1 :]
    elif mutation == "truncate":
        value = value[: draw(st.integers(0, len(value) - 1))]
    elif mutation == "upper":
        value = value.upper()
    elif mutation == "zero-trace":
        value = value[:3] + b"0" * 32 + value[35:]
    elif mutation == "zero-parent":
        value = value[:36] + b"0" * 16 + value[52:]
    elif mutation == "nul":
        at = draw(st.integers(0, len(value)))
        value = value[:at] + b"\x00" + value[at:]
    elif mutation == "ff":
        value = b"ff" + value[2:]
    elif mutation == "any":
        return draw(st.none() | st.binary(max_size=70))
    return value


# header names the Python producer can send and the client delivers as sent (it cuts a name at
# a NUL, and cannot encode a lone surrogate)
producible_names = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12
) | st.sampled_from(["traceparent", "tracestate", "Traceparent", "", "baggage"])
header_values = st.none() | st.binary(max_size=40) | st.text(max_size=20).map(str.encode)


def _many_headers(seed: int) -> list[tuple[str, bytes | None]]:
    """Hundreds of headers (too many to draw one by one), and sometimes ~100 KB values."""
    rnd = random.Random(seed)
    out: list[tuple[str, bytes | None]] = []
    for _ in range(rnd.randint(100, 400)):
        name = "".join(
            chr(rnd.choice([rnd.randint(1, 127), rnd.randint(128, 0xD7FF)]))
            for _ in range(rnd.randint(0, 6))
        )
        kind = rnd.random()
        value = None if kind < 0.1 else rnd.randbytes(rnd.randint(0, 30))
        out.append((name, value))
    for _ in range(rnd.randint(0, 2)):
        huge = rnd.randbytes(100_000) if rnd.random() < 0.5 else b"\x00" * 100_000
        out.insert(rnd.randint(0, len(out)), (rnd.choice(["big", "traceparent-ish"]), huge))
    return out


@st.composite
def records(draw) -> dict:
    shape = draw(st.sampled_from(["none", "few", "few", "few", "few", "many"]))
    headers: list | None
    if shape == "none":
        headers = None
    elif shape == "few":
        headers = draw(st.lists(st.tuples(producible_names, header_values), max_size=6))
    else:
        headers = _many_headers(draw(st.integers(0, 2**32)))
    count = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))
    if count:
        headers = headers if headers is not None else []
        first = draw(traceparents())
        agree = draw(st.booleans())
        for _ in range(count):
            value = first if agree else draw(traceparents())
            headers.insert(draw(st.integers(0, len(headers))), ("traceparent", value))
    # some records come from a client that sends header names as bytes, which may not be UTF-8
    raw_names = None
    if headers and draw(st.integers(0, 7)) == 0:
        raw_names = [name.encode() for name, _ in headers]
        if draw(st.booleans()):
            invalid = draw(
                st.binary(min_size=1, max_size=8).filter(
                    lambda b: b"\x00" not in b and not _utf8(b)
                )
            )
            raw_names[draw(st.integers(0, len(raw_names) - 1))] = invalid
    key_kind = draw(st.sampled_from(["aggregate", "aggregate", "none", "bytes", "text"]))
    return {
        "headers": headers,
        "raw_names": raw_names,
        "key_kind": key_kind,
        "key": draw(st.binary(max_size=30)) if key_kind == "bytes" else None,
        "key_text": draw(st.text(max_size=12)) if key_kind == "text" else None,
        "trace_id": draw(st.none() | st.none() | st.none() | _hex(32)),
    }


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
        return True
    except UnicodeError:
        return False


# --- pure tests -------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.lists(st.tuples(st.text(), st.none() | st.binary() | st.text().map(str.encode))))
def test_any_headers_round_trip_exactly_through_their_stored_form(headers):
    stored = metadata.headers_json(headers)
    parsed = orjson.loads(stored)
    assert metadata.decode_headers(parsed) == headers
    # storable: jsonb refuses only NUL in a string; nothing else needs care
    strings = [s for pair in parsed for s in pair if isinstance(s, str)]
    assert not any("\x00" in s for s in strings)
    assert "\\u0000" not in stored or "\\\\u0000" in stored


@given(st.lists(st.tuples(st.text("abc-_ ", max_size=5), st.binary(max_size=5).filter(_utf8))))
def test_clean_headers_are_stored_as_readable_text(headers):
    clean = [(k, v) for k, v in headers if b"\x00" not in v]
    assert json.loads(metadata.headers_json(clean)) == [[k, v.decode()] for k, v in clean]


def test_a_repeated_header_name_keeps_every_value_in_order():
    headers = [("k", b"2"), ("k", None), ("a", b"\xff"), ("k", b"1")]
    assert json.loads(metadata.headers_json(headers)) == [
        ["k", "2"],
        ["k", None],
        ["a", {"base64": "/w=="}],
        ["k", "1"],
    ]


@settings(max_examples=300)
@given(st.binary(max_size=40) | st.text(max_size=20).map(str.encode))
def test_any_key_round_trips_exactly_and_its_text_is_storable(key):
    text, raw = metadata.split_key(key)
    assert metadata.join_key(text, raw) == key
    assert "\x00" not in text
    assert (raw is None) == (_utf8(key) and b"\x00" not in key)


def test_the_text_backslash_xff_and_the_byte_ff_are_told_apart():
    assert metadata.split_key(b"\\xff") == ("\\xff", None)
    assert metadata.split_key(b"\xff") == ("\\xff", b"\xff")
    assert metadata.headers_json([("k", b"\\xff")]) != metadata.headers_json([("k", b"\xff")])


@settings(max_examples=500)
@given(traceparents())
def test_a_trace_id_is_taken_exactly_from_a_well_formed_traceparent(value):
    trace_id, why = metadata.parse_traceparent(value)
    assert trace_id == w3c_trace_id(value)
    assert (why is None) == (trace_id is not None)
    if why is not None:
        assert DROP_REASON.fullmatch(metadata.DROPPED + why), why


TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "the header has no value"),
        (b"0A" + TP[2:], "version is not 2 lowercase hex"),
        (b"ff" + TP[2:], "version ff is invalid"),
        (TP + b"-00", "version 00 is not exactly 55 characters"),
        (b"01" + TP[2:-1], "shorter than 55 characters"),
        (TP[:3] + TP[3:7].upper() + TP[7:], "trace-id is not 32 lowercase hex"),
        (TP[:3] + b"\x00" + TP[4:], "trace-id is not 32 lowercase hex"),
        (TP[:3] + b"0" * 32 + TP[35:], "trace-id is all zeros"),
        (TP[:36] + b"0" * 16 + TP[52:], "parent-id is all zeros"),
        (TP[:36] + b"g" + TP[37:], "parent-id is not 16 lowercase hex"),
        (TP[:53] + b"0G", "trace-flags is not 2 lowercase hex"),
        (b"01" + TP[2:] + b"x", "trace-flags is not followed by '-'"),
        (TP[:35] + b"_" + TP[36:], "fields are not separated by '-'"),
    ],
)
def test_a_malformed_traceparent_is_dropped_saying_why(value, why):
    assert metadata.parse_traceparent(value) == (None, why)


def test_repeated_traceparents_keep_their_trace_id_only_when_they_agree():
    other = TP[:3] + b"a" * 32 + TP[35:]
    agreeing = [("traceparent", TP), ("x", b""), ("traceparent", TP[:-2] + b"00")]
    assert metadata.trace_from_headers(agreeing) == ("4bf92f3577b34da6a3ce929d0e0e4736", None)
    assert metadata.trace_from_headers([("traceparent", TP), ("traceparent", other)]) == (
        None,
        "traceparent dropped: 2 traceparent headers name different trace ids",
    )
    assert metadata.trace_from_headers([("traceparent", TP), ("traceparent", None)]) == (
        None,
        "traceparent dropped: header 2 of 2 named traceparent: the header has no value",
    )
    assert metadata.trace_from_headers([("Traceparent", TP)]) == (None, None)


class UnreadableHeaders(FakeMessage):
    def headers(self):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def _event_line(batch: _Batch) -> list[str]:
    assert len(batch.events) == 1 and not batch.dead
    line = batch.events[0]
    assert line.endswith("\n") and line.count("\n") == 1 and "\x00" not in line
    return line[:-1].split("\t")


def test_headers_the_client_cannot_read_leave_the_event_landing_with_a_note():
    value = json.dumps(_envelope("ord-1", trace_id="t-1")).encode()
    batch = _Batch(OffsetRange("t", 0, 0, 10), "run", 1_000_000)
    batch.add(UnreadableHeaders(value, b"ord-1"))
    fields = _event_line(batch)
    assert fields[10] == "\\N"  # headers
    assert fields[11] == "t-1"  # the envelope's trace id still counts
    assert fields[14] == metadata.HEADERS_UNREADABLE


def test_the_usual_record_adds_nothing_but_two_nulls_to_its_line():
    value = json.dumps(_envelope("ord-1")).encode()
    batch = _Batch(OffsetRange("t", 0, 0, 10), "run", 1_000_000)
    batch.add(FakeMessage(value, b"ord-1", [("traceparent", TP)]))
    fields = _event_line(batch)
    assert fields[9] == "ord-1" and fields[11] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert fields[13:15] == ["\\N", "\\N"]


# --- through Kafka, Postgres and dbt ----------------------------------------------------------


def _envelope(aggregate_id: str, trace_id: str | None = None, pad: int = 0) -> dict:
    env = {
        "event_id": str(uuid.uuid4()),
        "aggregate_id": aggregate_id,
        "event_type": "OrderCreated",
        "payload": {
            "customer_id": "cust-0001",
            "order_total": 1.5,
            "currency": "EUR",
            "items": [{"sku": "SKU-0001", "qty": 1, "unit_price": 1.5}],
            "channel": "web",
        },
        "timestamp": 1_735_689_600_000,
        "schema_version": 2,
    }
    if pad:
        env["payload"]["note"] = "x" * pad  # readers ignore unknown fields
    if trace_id is not None:
        env["trace_id"] = trace_id
    return env


def _produce(bootstrap: str, topic: str, recs: list[dict]) -> None:
    """Send every record: through confluent-kafka's Producer, or with byte header names
    through librdkafka itself."""
    big = {"message.max.bytes": 2_000_000}
    with (
        EventProducer(bootstrap, topic=topic, extra=big) as producer,
        RawProducer(bootstrap) as raw,
    ):
        for rec in recs:
            if rec["raw_names"] is not None:
                pairs = [(n, v) for n, (_, v) in zip(rec["raw_names"], rec["headers"], strict=True)]
                raw.produce(topic, rec["value"], rec["key_bytes"], pairs)
            else:
                producer.produce_raw(rec["value"], rec["key_bytes"], None, rec["headers"])


def _prepare(rec: dict, pad: int = 0) -> dict:
    """Fill in the record's envelope and key bytes, and what the landing must make of it."""
    aggregate = f"ord-meta-{uuid.uuid4().hex[:12]}"
    env = _envelope(aggregate, rec["trace_id"], pad)
    key = {
        "aggregate": aggregate.encode(),
        "none": None,
        "bytes": rec["key"],
        "text": (rec["key_text"] or "").encode("utf-8", "surrogatepass"),
    }[rec["key_kind"]]
    # what the client delivers: no headers at all as None; a header name it cannot decode
    # loses all of them
    delivered = rec["headers"] or None
    unreadable = rec["raw_names"] is not None and not all(map(_utf8, rec["raw_names"]))
    if unreadable:
        delivered = None
    trace_id, dropped = expected_trace(rec["trace_id"], delivered)
    return {
        **rec,
        "event_id": env["event_id"],
        "aggregate_id": aggregate,
        "value": json.dumps(env).encode(),
        "key_bytes": key,
        "delivered": delivered,
        "unreadable": unreadable,
        "expect_trace": trace_id,
        "dropped": dropped,
    }


def _assert_stored_exactly(conn: psycopg.Connection, topic: str, recs: list[dict]) -> None:
    rows = {
        str(r[0]): r[1:]
        for r in conn.execute(
            "select e.event_id, e.key, e.key_bytes, e.headers, e.trace_id, e.metadata_note,"
            " a.reason, a.trace_id from raw.order_events e join audit.ingest_log a"
            " using (topic, kafka_partition, kafka_offset) where e.topic = %s",
            (topic,),
        )
    }
    assert len(rows) == len(recs)
    for rec in recs:
        key, key_bytes, headers, trace_id, note, reason, audit_trace = rows[rec["event_id"]]
        assert (
            metadata.join_key(key, None if key_bytes is None else bytes(key_bytes))
            == rec["key_bytes"]
        )
        assert (None if headers is None else metadata.decode_headers(headers)) == rec["delivered"]
        assert trace_id == audit_trace == rec["expect_trace"], rec
        assert note == reason
        if rec["unreadable"]:
            assert reason == metadata.HEADERS_UNREADABLE
        elif rec["dropped"]:
            assert reason is not None and DROP_REASON.fullmatch(reason), (reason, rec)
        else:
            assert reason is None, (reason, rec)


def _headers_read_in_sql(
    conn: psycopg.Connection, topic: str, *, text_names: bool = True
) -> dict[str, list]:
    """Every event's headers as the SQL in docs/event-contract.md reads them, by event_id."""
    doc = (REPO / "docs" / "event-contract.md").read_text()
    query = doc.split("A header's bytes in SQL")[1].split("```sql\n")[1].split(";\n```")[0]
    out: dict[str, list] = {}
    statement = psycopg.sql.SQL(
        "select * from ({}) q where event_id in"
        " (select event_id from raw.order_events where topic = %s) order by 1, 2"
    ).format(psycopg.sql.SQL(query))
    for event_id, _, name, value in conn.execute(statement, (topic,)):
        name = bytes(name).decode() if text_names else bytes(name)
        pair = (name, None if value is None else bytes(value))
        out.setdefault(str(event_id), []).append(pair)
    return out


def test_the_documented_sql_reads_any_stored_header_back_exactly(postgres_dsn):
    # names the client cannot deliver too (NUL, not UTF-8): another writer may store them
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        store.ensure_schema(conn)

        @settings(max_examples=60, deadline=None)
        @given(st.lists(st.tuples(st.text(), header_values), min_size=1, max_size=5))
        def read_back(headers):
            topic = f"sql-{uuid.uuid4().hex[:8]}"
            row = conn.execute(
                "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
                " aggregate_id, event_type, schema_version, event_ts_ms, payload, headers,"
                " run_id) values (%s, 0, 0, %s, 'a', 'OrderCancelled', 1, 0, '{}', %s::jsonb,"
                " 'r') returning event_id",
                (topic, str(uuid.uuid4()), metadata.headers_json(headers)),
            ).fetchone()
            read = _headers_read_in_sql(conn, topic, text_names=False)
            assert read == {
                str(row[0]): [(k.encode("utf-8", "surrogatepass"), v) for k, v in headers]
            }

        read_back()


def test_hostile_headers_and_keys_never_fail_a_range_and_are_stored_exactly(
    kafka_bootstrap, postgres_dsn, monkeypatch
):
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", "analytics")
    landed: list[dict] = []

    @settings(
        max_examples=5,
        deadline=None,
        # an example is a topic landed: shrinking one would take minutes
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(records(), min_size=30, max_size=60))
    def land_one_topic(drawn):
        topic = f"orders.events.meta-{uuid.uuid4().hex[:10]}"
        manager.ensure_topics(kafka_bootstrap, {topic: 4})
        # hypothesis may draw only simple records: these are in every example, whatever it draws
        always = [
            _record(headers=[("traceparent", NUL_TRACEPARENT)], key_kind="bytes", key=b"\x00"),
            _record(headers=[("traceparent", TP)], key_kind="text", key_text="\\xff"),
            _record(
                headers=[("traceparent", TP), ("x", None)],
                raw_names=[b"traceparent", b"\xff"],
                key_kind="bytes",
                key=b"\xff",
            ),
            _record(headers=_many_headers(len(landed))),
        ]
        recs = [_prepare(r) for r in [*drawn, *always]]
        _produce(kafka_bootstrap, topic, recs)
        with connections(kafka_bootstrap, postgres_dsn, group=f"meta-{topic}") as (conn, consumer):
            land_all(conn, consumer, topic, max_events=25)
            inv = invariants(conn, consumer, topic, len(recs))
            inv.assert_exactly_once()
            dead = conn.execute(
                "select reason, detail from raw.dead_letters where topic = %s", (topic,)
            ).fetchall()
            assert dead == [] and inv.raw_rows == len(recs)
            _assert_stored_exactly(conn, topic, recs)
            in_sql = _headers_read_in_sql(conn, topic)
            assert in_sql == {r["event_id"]: r["delivered"] for r in recs if r["delivered"]}
        landed.extend(recs)

    land_one_topic()
    assert any(r["dropped"] for r in landed) and any(r["unreadable"] for r in landed)
    assert any(r["expect_trace"] and not r["trace_id"] for r in landed)
    # the marts build over all of it, and each order shows the trace id its event kept
    run_dbt_build(postgres_dsn)
    with psycopg.connect(postgres_dsn) as conn:
        shown = dict(
            conn.execute(
                "select order_id, last_trace_id from analytics.order_status"
                " where order_id like 'ord-meta-%'"
            ).fetchall()
        )
    assert shown == {r["aggregate_id"]: r["expect_trace"] for r in landed}


def _record(**fields) -> dict:
    return {
        "headers": None,
        "raw_names": None,
        "key_kind": "aggregate",
        "key": None,
        "key_text": None,
        "trace_id": None,
        **fields,
    }


NUL_TRACEPARENT = TP[:3] + b"\x00" + TP[4:]


def _land_records(kafka_bootstrap, postgres_dsn, topic, recs: list[dict]) -> list[dict]:
    recs = [_prepare(_record(**rec)) for rec in recs]
    _produce(kafka_bootstrap, topic, recs)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_all(conn, consumer, topic)
        inv = invariants(conn, consumer, topic, len(recs))
        inv.assert_exactly_once()
        assert inv.dead_letters == 0
        _assert_stored_exactly(conn, topic, recs)
    return recs


def test_a_nul_in_a_traceparent_header_never_fails_a_range(kafka_bootstrap, postgres_dsn, topic):
    (rec,) = _land_records(
        kafka_bootstrap, postgres_dsn, topic, [{"headers": [("traceparent", NUL_TRACEPARENT)]}]
    )
    with psycopg.connect(postgres_dsn) as conn:
        (reason,) = conn.execute(
            "select reason from audit.ingest_log where event_id = %s", (rec["event_id"],)
        ).fetchone()
    assert reason == "traceparent dropped: trace-id is not 32 lowercase hex"


def test_header_names_that_are_not_utf8_never_fail_a_range(kafka_bootstrap, postgres_dsn, topic):
    # many in one range: the client's failure must be caught on every record, not only while
    # the interpreter still runs the landing's loop unspecialized
    unreadable = {
        "headers": [("traceparent", TP), ("x", b"1")],
        "raw_names": [b"traceparent", b"\xff\xfe"],
        "key_kind": "bytes",
        "key": b"\x00\xff",
    }
    readable = {"headers": [("traceparent", TP)], "raw_names": [b"traceparent"]}
    recs = _land_records(
        kafka_bootstrap, postgres_dsn, topic, [unreadable, readable, readable] * 20
    )
    assert [r["expect_trace"] for r in recs[:3]] == [None, TP[3:35].decode(), TP[3:35].decode()]
    assert recs[0]["unreadable"] and not recs[1]["unreadable"]


def test_a_replayed_dead_letter_keeps_its_headers_and_key_exactly(
    kafka_bootstrap, postgres_dsn, topic
):
    headers = [
        ("traceparent", TP),
        ("k\x01", b"\x00\xff"),
        ("k\x01", None),
        ("v", b"\\xff"),
    ]
    rec = _prepare(_record(headers=headers, key_kind="bytes", key=b"\\x00\x00\xff"), pad=5_000)
    _produce(kafka_bootstrap, topic, [rec])
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10, max_inflight=10)
        for rng in plan.unlanded:  # the limit is below the record's size: a dead letter
            land_range(rng, conn=conn, consumer=consumer, run_id="small", max_message_bytes=1000)
        reason, key, stored = conn.execute(
            "select reason, key, headers from raw.dead_letters where topic = %s", (topic,)
        ).fetchone()
        assert reason == Reason.OVERSIZE and bytes(key) == rec["key_bytes"]
        assert metadata.decode_headers(stored) == headers
        report = replay(conn, topic=topic, reason=Reason.OVERSIZE, max_message_bytes=100_000)
        assert len(report.replayed) == 1
        key, key_bytes, stored, trace_id, note = conn.execute(
            "select key, key_bytes, headers, trace_id, metadata_note from raw.order_events"
            " where topic = %s",
            (topic,),
        ).fetchone()
    assert metadata.join_key(key, bytes(key_bytes)) == rec["key_bytes"]
    assert metadata.decode_headers(stored) == headers
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and note is None
