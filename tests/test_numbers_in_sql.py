"""The SQL that reads payload numbers, against a real Postgres and many generated values.

- dbt's `json_numeric` macro never raises: a value that does not fit numeric(p, s) once
  rounded, or a string numeric's input might refuse, is null; everything else is the rounded
  number, as Postgres' numeric(p, s) rounds it.
- `raw.canonical_json_text` (landing schema.sql), which content_hash hashes, gives one text to
  every spelling of the same doubles (money's range), so to what the fast and the thorough
  reader store of one payload; it leaves strings and integers alone, and jsonb's own text as it
  is when that holds no number to rewrite (such copies hash as plain jsonb text).
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext

import jinja2
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from orderflow_dagster.land import store
from orderflow_dagster.land.parse import Event, parse_fast, parse_thorough
from orderflow_dagster.transform.dbt import DBT_PROJECT_DIR
from tests.support import scratch_database
from tests.test_hostile_numbers import number_literals, numeric_strings, spellings

MACRO = (DBT_PROJECT_DIR / "macros" / "json_numeric.sql").read_text()
SQL_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def db(stack_dsn):
    with scratch_database(stack_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        store.ensure_schema(conn)
        yield conn


def json_numeric_sql(column: str, precision: int, scale: int) -> str:
    """The macro, rendered as dbt renders it (plain Jinja: it uses nothing of dbt's)."""
    template = jinja2.Environment().from_string(MACRO + "{{ json_numeric(c, p, s) }}")
    return template.render(c=column, p=precision, s=scale)


def storable(literal: str) -> bool:
    """Whether jsonb takes the JSON number `literal` at all (numeric's limits)."""
    exact = Decimal(literal)
    return exact.as_tuple().exponent >= -16383 and (exact == 0 or exact.adjusted() < 131072)


# ---------------------------------------------------------------------------------------------
# json_numeric

_NUMERIC_STRING = re.compile(r"[ \t\n\r]*-?[0-9]+(\.[0-9]+)?[ \t\n\r]*")

json_values = st.one_of(
    number_literals.filter(storable).map(lambda n: ("number", n)),
    numeric_strings.map(lambda s: ("string", s)),
    st.text(alphabet="0123456789 .-+eE\t\n\u3000\u00a0x", max_size=14).map(lambda s: ("string", s)),
    st.sampled_from(["null", "true", "[]", "{}", "[1.5]", '{"a": 1}']).map(lambda j: ("json", j)),
)


def expected_numeric(kind: str, text: str, precision: int, scale: int) -> Decimal | None:
    if kind == "json":
        return None
    if kind == "string":
        if len(text) > 1000 or not _NUMERIC_STRING.fullmatch(text):
            return None
        text = text.strip(" \t\n\r")
    exact = Decimal(text)
    if abs(exact) >= 10 ** (precision - scale):  # beyond the type even before rounding
        return None
    with localcontext() as ctx:
        ctx.prec = precision + 10
        rounded = exact.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    return rounded if abs(rounded) < 10 ** (precision - scale) else None


@SQL_SETTINGS
@given(
    values=st.lists(json_values, min_size=1, max_size=40),
    type_=st.sampled_from([(12, 2), (5, 0), (4, 4), (20, 6)]),
)
def test_json_numeric_never_raises_and_is_null_exactly_where_the_type_cannot_hold_the_value(
    db, values, type_
):
    precision, scale = type_
    documents = [text if kind != "string" else json.dumps(text) for kind, text in values]
    query = sql.SQL(
        "select {} from unnest(%s::jsonb[]) with ordinality as given (doc, position)"
        " order by position"
    ).format(sql.SQL(json_numeric_sql("doc", precision, scale)))
    rows = db.execute(query, (documents,)).fetchall()
    for (kind, text), (actual,) in zip(values, rows, strict=True):
        assert actual == expected_numeric(kind, text, precision, scale), (kind, text)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("12345678901.5", None),  # beyond numeric(12, 2)
        ("1e10", None),
        ("9999999999.995", None),  # rounds up to 10000000000.00
        ("9999999999.994999", Decimal("9999999999.99")),
        ("-9999999999.995", None),
        ("1e-300", Decimal("0.00")),
        ('"99999999999999999999.99"', None),
        ('"' + "1" * 2000 + '"', None),  # numeric's input would take it; the type would not
        ('" 12.50 "', Decimal("12.50")),
        ('"12.5\u3000"', None),  # an ideographic space: not one numeric's input skips
    ],
)
def test_json_numeric_examples(db, document, expected):
    query = sql.SQL("select {} from (select %s::jsonb as doc) as given").format(
        sql.SQL(json_numeric_sql("doc", 12, 2))
    )
    (actual,) = db.execute(query, (document,)).fetchone()
    assert actual == expected


# ---------------------------------------------------------------------------------------------
# raw.canonical_json_text


def canonical(conn: psycopg.Connection, documents: list[str]) -> list[str]:
    return _each(conn, "raw.canonical_json_text(doc)", documents)


def jsonb_text(conn: psycopg.Connection, documents: list[str]) -> list[str]:
    return _each(conn, "doc::text", documents)


def _each(conn: psycopg.Connection, expression: str, documents: list[str]) -> list[str]:
    query = sql.SQL(
        "select {} from unnest(%s::jsonb[]) with ordinality as given (doc, position)"
        " order by position"
    ).format(sql.SQL(expression))
    return [text for (text,) in conn.execute(query, (documents,))]


# what the readers hold of money: doubles below 10^10, as in the contract
money_doubles = st.floats(min_value=-9999999999.99, max_value=9999999999.99, allow_nan=False)
# numbers whose jsonb text has nothing to rewrite: at most five decimals, the last one not 0
settled_decimals = st.decimals(
    min_value=-9999999999, max_value=9999999999, allow_nan=False, places=5
).map(lambda d: str(d.normalize()) if d != d.to_integral_value() else str(int(d)))


# keys jsonb can hold: no NUL, no lone surrogate
KEYS = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=6)


def trees(numbers: st.SearchStrategy) -> st.SearchStrategy:
    """Nested arrays and objects around `numbers`, integers of any size, strings that look
    like numbers, and constants."""
    leaves = st.one_of(
        numbers.map(lambda n: ("number", n)),
        st.integers(min_value=-(2**80), max_value=2**80).map(lambda i: ("json", i)),
        st.text(alphabet='0123456789.,]}"\\ xe-', max_size=12).map(lambda t: ("json", t)),
        st.sampled_from([None, True, False]).map(lambda c: ("json", c)),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(lambda xs: ("array", xs)),
            st.dictionaries(KEYS, children, max_size=4).map(lambda d: ("object", d)),
        ),
        max_leaves=12,
    )


def write(node, spell) -> str:
    """JSON text of a tree, each number written as `spell(number)` returns it."""
    kind, value = node
    if kind == "number":
        return spell(value)
    if kind == "array":
        return "[" + ",".join(write(child, spell) for child in value) + "]"
    if kind == "object":
        return "{" + ",".join(f"{json.dumps(k)}:{write(v, spell)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@SQL_SETTINGS
@given(data=st.data())
def test_numerically_equal_json_has_one_canonical_text(db, data):
    documents = data.draw(st.lists(trees(money_doubles), min_size=1, max_size=20))

    def spell(value: float) -> str:
        return data.draw(spellings(value))

    first = [write(tree, spell) for tree in documents]
    second = [write(tree, spell) for tree in documents]
    texts = canonical(db, first)
    assert texts == canonical(db, second), list(zip(first, second, strict=True))
    for original, text in zip(first, texts, strict=True):
        assert json.loads(text) == json.loads(original)  # the same document, as a reader reads it
    assert canonical(db, texts) == texts  # and already canonical


@SQL_SETTINGS
@given(documents=st.lists(trees(settled_decimals), min_size=1, max_size=30))
def test_jsonb_text_with_no_number_to_rewrite_is_its_own_canonical_text(db, documents):
    """The money producers send (a few decimals) keeps the hash its copies always had."""
    texts = [write(tree, str) for tree in documents]
    assert canonical(db, texts) == jsonb_text(db, texts)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ('{"a": 10.50}', '{"a": 10.5}'),
        ("[100.0, 1.0e2, 1E+2, -0.0, 0.000]", "[100, 100, 100, 0, 0]"),
        ('["10.50", "a\\"10.50,", {"k 1.0]": 1.50}]', '["10.50", "a\\"10.50,", {"k 1.0]": 1.5}]'),
        ("[0.1000000000000000055511151231257827, 0.123456]", "[0.1, 0.123456]"),
        ("[12345678901234567890123, 1234567890123456789012.0]", None),
        ("[1.5, 2, 1e-320]", None),
    ],
)
def test_canonical_text_examples(db, document, expected):
    (plain,) = jsonb_text(db, [document])
    (text,) = canonical(db, [document])
    if expected is None:  # integers stay exact, however long, and so do subnormal doubles
        expected = plain.replace("1234567890123456789012.0", "1234567890123456789012")
    assert text == expected


# ---------------------------------------------------------------------------------------------
# both readers, one hash


@SQL_SETTINGS
@given(data=st.data())
def test_the_fast_and_the_thorough_reader_store_one_canonical_text(db, data):
    fast, thorough = [], []
    for amount in data.draw(st.lists(money_doubles.filter(lambda v: v >= 0), max_size=20)):
        spelled = data.draw(spellings(amount))
        raw = (
            '{"event_id":"0193c0de-0000-7000-8000-000000000001","aggregate_id":"ord-1",'
            '"event_type":"PaymentProcessed","payload":{"payment_id":"p","amount":' + spelled + ","
            '"currency":"EUR","method":"card"},"timestamp":1735689600000,"schema_version":1}'
        ).encode()
        by_thorough = parse_thorough(raw)
        assert isinstance(by_thorough, Event), spelled
        by_fast = parse_fast(raw) or by_thorough  # zero, for one, is the thorough reader's
        fast.append(by_fast.payload_json)
        thorough.append(by_thorough.payload_json)
    assert canonical(db, fast) == canonical(db, thorough)
