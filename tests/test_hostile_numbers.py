"""Hostile numbers, end to end: real Kafka, the real landing, Postgres and a real dbt build.

Producers send payload numbers of every form JSON allows (any magnitude, tiny and negative,
fractional quantities, many decimals, exponents, integers beyond 64 bits, trailing zeros) and
numeric-looking strings wherever a string is accepted. Whatever they send, the build succeeds,
every relation of the staging and analytics schemas reads whole, and each event either landed
or was dead-lettered with a reason naming the field and the bound it broke. Nothing is lost.

The hypothesis test sends hostile Kafka headers with the same records (`HOSTILE_HEADERS`:
names and values of any bytes, NUL, None, malformed traceparents, hundreds of headers): metadata
never fails a range, a build or a read either.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from psycopg import sql

from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.transform.dbt import run_dbt_build
from tests.support import invariants
from tests.test_landing import connections, land_all
from tests.test_metadata import _many_headers, header_values, producible_names, traceparents

# the contract's bounds (orderflow_dagster/contract/schemas/), as a producer reads them
MONEY_MAX = 9999999999.99
QTY_MAX = 1_000_000
BASE_MS = 1_735_689_600_000

# ---------------------------------------------------------------------------------------------
# number literals, as a producer's JSON writer (or a hostile one) might spell them

_near_bounds = st.sampled_from(
    [
        "0", "-0", "-0.0", "0.00", "0e-99999", "1e-300", "1e-400", "1e-16384", "5e-324",
        "-0.01", "-1", "0.001", "0.005", "0.015", "12.345", "10.50", "100.000", "1E+2", "1.5e3",
        "9999999999.99", "9999999999.990", "9999999999.994", "9999999999.995", "9999999999.999",
        "10000000000", "1e10", "12345678901.5", "99999999999999999999.99", "1e308", "1e400",
        "1", "2", "1.0", "2.5", "1e2", "1000000", "1000000.0", "1000001", "9223372036854775807",
        "9223372036854775808", "18446744073709551616", "1" + "0" * 30, "1" + "0" * 400,
        "0.1000000000000000055511151231257827", "0." + "0" * 17000 + "1",
    ]
)  # fmt: skip


@st.composite
def _decimal_literal(draw) -> str:
    digits = draw(st.text("0123456789", min_size=1, max_size=40)).lstrip("0") or "0"
    fraction = draw(st.text("0123456789", max_size=30))
    text = ("-" if draw(st.booleans()) else "") + digits + ("." + fraction if fraction else "")
    if draw(st.booleans()):
        text += draw(st.sampled_from("eE")) + draw(st.sampled_from(["", "+", "-"]))
        text += str(draw(st.integers(min_value=0, max_value=20_000)))
    return text


_money_in_range = st.decimals(min_value=0, max_value=Decimal("9999999999.99"), places=2)
_plain = st.one_of(
    _money_in_range.map(str),
    _money_in_range.map(lambda d: repr(float(d))),
    st.integers(min_value=1, max_value=QTY_MAX).map(str),
)
number_literals = st.one_of(
    _plain,
    _near_bounds,
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=0, max_value=10**320).map(str),
    _decimal_literal(),
)
numeric_strings = st.one_of(
    _near_bounds, _decimal_literal(), st.sampled_from(["NaN", "-Infinity", " 12.50 ", "1,5"])
)


class Literal(str):
    """A JSON number literal, written into the envelope exactly as it is spelled."""


def encode(value) -> str:
    """JSON text in which every Literal is written as is."""
    if isinstance(value, Literal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# what the contract says of each number: the independent oracle of a record's fate


def as_read(literal: str) -> float | int | None:
    """The value a JSON reader holds for `literal` (an exact integer within 64 bits, else the
    nearest double), or None when no double holds it."""
    integer = "." not in literal and "e" not in literal.lower()
    if integer and -(2**63) <= int(literal) < 2**64:
        return int(literal)
    value = float(Decimal(literal))
    return None if value in (float("inf"), float("-inf")) else value


@dataclass(frozen=True)
class Breach:
    field: str  # as the dead letter names it, e.g. "payload.items[0].qty"
    words: str  # what the reason says of the bound


def breaches(field: str, literal: str, *, quantity: bool) -> list[Breach]:
    value = as_read(literal)
    if value is None:
        return [Breach("", "number is infinity when parsed as double")]
    if quantity:
        if isinstance(value, float) and not value.is_integer():
            return [Breach(field, "must be integer")]
        low, high = 1, QTY_MAX
    else:
        low, high = 0, MONEY_MAX
    if value < low:
        return [Breach(field, f"must be bigger than or equal to {low}")]
    if value > high:
        return [Breach(field, f"must be smaller than or equal to {high}")]
    return []


class Record:
    """One produced event and what the contract says of it. A plain class: hypothesis prints
    dataclasses field by field, and a batch of them whole."""

    def __init__(self, event_id, order_id, value, headers, event_type, breaches, twin=None):
        self.event_id: str = event_id
        self.order_id: str = order_id
        self.value: bytes = value
        self.headers = headers
        self.event_type: str = event_type
        self.breaches: list[Breach] = breaches
        # a second copy of an in-contract event, its numbers spelled otherwise, read by the
        # other reader: the same content, never a conflict
        self.twin: bytes | None = twin

    def __repr__(self) -> str:
        return f"Record({self.value[:300]!r}, breaches={self.breaches}, twin={self.twin!r:.300})"


NO_HEADERS = st.none()


@st.composite
def hostile_record(
    draw, headers: st.SearchStrategy = NO_HEADERS, order_id: str = "ord-1"
) -> Record:
    """One OrderCreated or PaymentProcessed whose payload numbers are hostile; `headers` draws
    its Kafka headers."""
    event_type = draw(st.sampled_from(["OrderCreated", "OrderCreated", "PaymentProcessed"]))
    found: list[Breach] = []

    def number(field: str, *, quantity: bool = False) -> Literal:
        literal = draw(number_literals)
        found.extend(breaches(field, literal, quantity=quantity))
        return Literal(literal)

    def text(plain: str) -> str:
        return draw(numeric_strings) if draw(st.integers(0, 3)) == 0 else plain

    if event_type == "OrderCreated":
        version = draw(st.sampled_from([1, 2]))
        items = [
            {
                "sku": text(f"SKU-{i:04d}"),
                "qty": number(f"payload.items[{i}].qty", quantity=True),
                "unit_price": number(f"payload.items[{i}].unit_price"),
            }
            for i in range(draw(st.integers(min_value=0, max_value=3)))
        ]
        payload = {
            "customer_id": text("cust-0001"),
            "order_total": number("payload.order_total"),
            "currency": "EUR",
            "items": items,
        }
        if version == 2:
            payload["channel"] = text("web")
    else:
        version = 1
        payload = {
            "payment_id": text("pay-1"),
            "amount": number("payload.amount"),
            "currency": "USD",
            "method": text("card"),
        }
    if draw(st.integers(0, 4)) == 0:  # a field the schema does not know: any number goes
        literal = draw(number_literals)
        if as_read(literal) is None:
            found.append(Breach("", "number is infinity when parsed as double"))
        payload["extra"] = Literal(literal)
    event_id = str(uuid.uuid4())  # not drawn: unique across examples
    envelope = {
        "event_id": event_id,
        "aggregate_id": order_id,
        "event_type": event_type,
        "payload": payload,
        "timestamp": draw(st.integers(min_value=BASE_MS, max_value=BASE_MS + 10**9)),
        "schema_version": version,
    }
    if draw(st.booleans()):  # an unknown envelope field: the thorough reader's turn
        envelope["source"] = "pos"
    twin = None
    if not found and draw(st.booleans()):
        # numbers of unknown fields only the thorough reader reads: they stay as they are
        copy = {
            **envelope,
            "payload": {k: v if k == "extra" else respelled(draw, v) for k, v in payload.items()},
        }
        if copy.pop("source", None) is None:
            copy["source"] = "pos"
        twin = encode(copy).encode()
    return Record(
        event_id, order_id, encode(envelope).encode(), draw(headers), event_type, found, twin
    )


def spellings(value: float) -> st.SearchStrategy[str]:
    """Ways JSON writers spell the number a double holds."""
    shortest = repr(value)
    every = [
        shortest,
        str(Decimal(value)),  # every digit of the double, as BigDecimal(double) writes it
        f"{value:.17g}",
        f"{value:.17e}",
        f"{value:.17E}",
    ]
    if "." in shortest and "e" not in shortest:
        every.append(shortest + "000")
    if value.is_integer():
        every += [str(int(value)), f"{int(value)}.0", f"{int(value)}.00", f"{int(value)}e0"]
    return st.sampled_from(every)


def respelled(draw, value):
    """`value` with each number literal spelled another way a reader reads alike."""
    if isinstance(value, Literal):
        number = as_read(value)
        if isinstance(number, int) and abs(number) < 2**53:
            number = float(number)  # every integer a double holds, written either way
        return Literal(draw(spellings(number))) if isinstance(number, float) else value
    if isinstance(value, dict):
        return {k: respelled(draw, v) for k, v in value.items()}
    if isinstance(value, list):
        return [respelled(draw, v) for v in value]
    return value


# Kafka headers as hostile producers send them (tests/test_metadata.py): any names the client
# delivers, values of any bytes, NUL, None, traceparents well-formed or not, hundreds of headers
HOSTILE_HEADERS = st.one_of(
    st.none(),
    st.lists(st.tuples(producible_names, header_values | traceparents()), max_size=8),
    st.integers(0, 2**32).map(_many_headers),
)


def hostile_records(headers: st.SearchStrategy = NO_HEADERS) -> st.SearchStrategy[list[Record]]:
    """A few dozen hostile records of a dozen orders (several events each)."""
    orders = [f"ord-{uuid.uuid4().hex[:12]}" for _ in range(12)]
    return st.lists(
        st.sampled_from(orders).flatmap(lambda order: hostile_record(headers, order)),
        min_size=30,
        max_size=60,
    )


# ---------------------------------------------------------------------------------------------
# the test


def produce_records(bootstrap: str, topic: str, records: list[Record]) -> None:
    with EventProducer(bootstrap, topic=topic) as producer:
        for record in records:
            producer.produce_raw(record.value, record.order_id.encode(), None, record.headers)
            if record.twin is not None:
                producer.produce_raw(record.twin, record.order_id.encode(), None, record.headers)


def read_every_relation(conn: psycopg.Connection, schemas: tuple[str, ...]) -> dict[str, int]:
    """`select *` of every table and view of `schemas`, fully fetched: rows per relation."""
    relations = conn.execute(
        "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = any(%s) and c.relkind in ('r', 'v', 'm', 'p', 'f')"
        " order by 1, 2",
        (list(schemas),),
    ).fetchall()
    rows = {}
    for schema, name in relations:
        query = sql.SQL("select * from {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        rows[f"{schema}.{name}"] = len(conn.execute(query).fetchall())
    return rows


class Landing:
    """One topic and database for all examples of a test: each example lands more records.
    A plain class whose repr leaves out the DSN, which holds the password."""

    def __init__(self, bootstrap: str, dsn: str, topic: str, conn, consumer) -> None:
        self.bootstrap, self.dsn, self.topic = bootstrap, dsn, topic
        self.conn, self.consumer = conn, consumer
        self.produced = 0

    def __repr__(self) -> str:
        return f"Landing(topic={self.topic!r}, produced={self.produced})"


@pytest.fixture
def landing(kafka_bootstrap, postgres_dsn, topic, monkeypatch):
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", "analytics")
    monkeypatch.setenv("ORDERFLOW_STAGING_SCHEMA", "staging")
    with connections(kafka_bootstrap, postgres_dsn, group=f"hostile-{topic}") as (conn, consumer):
        yield Landing(kafka_bootstrap, postgres_dsn, topic, conn, consumer)


@settings(
    max_examples=3,
    deadline=None,
    # each example is a landing and a dbt build: shrinking would rerun dozens of builds
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=hostile_records(headers=HOSTILE_HEADERS))
def test_no_number_or_header_a_producer_sends_fails_a_build_or_a_read_and_none_is_lost(
    landing, batch
):
    land_build_and_check(landing, batch)


def explicit(event_type: str, payload: dict, *breached: Breach, twin: dict | None = None):
    """A record of `payload` (numbers as Literal), which breaks the contract as `breached` says;
    `twin`: the payload of a second copy, read by the other reader."""
    event_id, order_id = str(uuid.uuid4()), f"ord-{uuid.uuid4().hex[:12]}"
    envelope = {
        "event_id": event_id,
        "aggregate_id": order_id,
        "event_type": event_type,
        "payload": payload,
        "timestamp": BASE_MS,
        "schema_version": 1,
    }
    copy = None if twin is None else encode({**envelope, "payload": twin, "source": "pos"})
    return Record(
        event_id,
        order_id,
        encode(envelope).encode(),
        None,
        event_type,
        list(breached),
        None if copy is None else copy.encode(),
    )


def order(total: str, qty: str = "1", unit_price: str = "1.5") -> dict:
    item = {"sku": "SKU-0001", "qty": Literal(qty), "unit_price": Literal(unit_price)}
    return {"customer_id": "c", "order_total": Literal(total), "currency": "EUR", "items": [item]}


def payment(amount: str) -> dict:
    return {"payment_id": "p", "amount": Literal(amount), "currency": "EUR", "method": "card"}


ABOVE_MONEY = f"must be smaller than or equal to {MONEY_MAX}"


def test_money_beyond_the_marts_is_dead_lettered_and_literals_jsonb_cannot_hold_land_re_encoded(
    landing,
):
    """The contract's own examples: each was a build failing for good, a view no one could
    read, or a landing's COPY failing on every retry (a stalled partition)."""
    land_build_and_check(
        landing,
        [
            explicit(
                "OrderCreated", order("12345678901.5"), Breach("payload.order_total", ABOVE_MONEY)
            ),
            explicit(
                "OrderCreated",
                order("1", unit_price="1e10"),
                Breach("payload.items[0].unit_price", ABOVE_MONEY),
            ),
            explicit(
                "OrderCreated",
                order("1", qty="2.5"),
                Breach("payload.items[0].qty", "must be integer"),
            ),
            explicit(
                "OrderCreated",
                order("1", qty="100000000000000000000"),
                Breach("payload.items[0].qty", f"must be smaller than or equal to {QTY_MAX}"),
            ),
            explicit(
                "PaymentProcessed",
                payment("-0.01"),
                Breach("payload.amount", "must be bigger than or equal to 0"),
            ),
            explicit("PaymentProcessed", payment("9999999999.99")),
            explicit("PaymentProcessed", payment("0e-99999")),
            explicit("PaymentProcessed", payment("1e-16384")),
            explicit("PaymentProcessed", payment("0." + "0" * 17000 + "1")),
            explicit(
                "OrderCreated",
                order("10.50", unit_price="10.50"),
                twin=order("10.5", unit_price="10.5"),
            ),
        ],
    )


def land_build_and_check(landing: Landing, batch: list[Record]) -> None:
    """Produce `batch`, land it with the real landing code and build the marts once, then check:
    every relation reads whole, nothing is lost, each record landed or was dead-lettered as the
    contract says, in-contract money is never null and copies read alike are no conflict."""
    conn, topic = landing.conn, landing.topic
    produce_records(landing.bootstrap, topic, batch)
    landing.produced += sum(1 + (record.twin is not None) for record in batch)
    land_all(conn, landing.consumer, topic, max_events=40)
    run_dbt_build(landing.dsn)  # raises if any model or data test fails

    read = read_every_relation(conn, ("staging", "analytics"))
    assert {"staging.stg_order_events", "analytics.order_items", "analytics.order_status"} <= set(
        read
    )
    invariants(conn, landing.consumer, topic, landing.produced).assert_exactly_once()

    landed = {
        str(event_id)
        for (event_id,) in conn.execute(
            "select event_id from raw.order_events where topic = %s", (topic,)
        )
    }
    dead = {
        json.loads(bytes(value))["event_id"]: (reason, detail)
        for value, reason, detail in conn.execute(
            "select value, reason, detail from raw.dead_letters where topic = %s", (topic,)
        )
    }
    # in-contract money always fits the marts: never mapped to null
    money = {
        str(event_id): amount
        for event_id, amount in conn.execute(
            "select event_id, coalesce(order_total, payment_amount) from analytics.order_events"
        )
    }
    unpriced_lines = {
        str(event_id)
        for (event_id,) in conn.execute(
            "select event_id from analytics.order_items where unit_price is null or qty is null"
        )
    }
    copies = dict(
        conn.execute(
            "select event_id::text, count(distinct content_hash) from analytics.event_copies"
            " group by event_id having count(*) > 1"
        ).fetchall()
    )
    conflicts = {
        str(event_id)
        for (event_id,) in conn.execute("select event_id from analytics.event_id_conflicts")
    }
    for record in batch:
        shown = record.value[:400]
        if not record.breaches:
            assert record.event_id in landed, shown
            assert money.get(record.event_id) is not None, shown
            assert record.event_id not in unpriced_lines, shown
            if record.twin is not None:
                assert copies.get(record.event_id) == 1, (shown, record.twin[:400])
            assert record.event_id not in conflicts, (shown, record.twin)
            continue
        assert record.event_id in dead, shown
        reason, detail = dead[record.event_id]
        assert any(
            b.field in detail
            and b.words in detail
            and reason == ("payload_schema_violation" if b.field else "invalid_json")
            for b in record.breaches
        ), (reason, detail, record.breaches)
