"""The operator's asset checks: Kafka lag and order_status staleness. Pure figures, and the
staleness read against a real Postgres ledger and a recorded dbt snapshot."""

import datetime as dt

import psycopg
from hypothesis import given
from hypothesis import strategies as st

from orderflow_dagster.defs.checks import (
    Staleness,
    kafka_lag_result,
    read_staleness,
    staleness_result,
    topic_lag,
)
from orderflow_dagster.land import store
from orderflow_dagster.land.ranges import OffsetRange

partition_marks = st.dictionaries(
    st.integers(0, 50),
    st.tuples(st.integers(0, 10**9), st.integers(0, 10**6)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=8,
)


@given(marks=partition_marks, data=st.data())
def test_kafka_lag_counts_exactly_the_offsets_not_committed(marks, data):
    committed = {
        p: data.draw(st.one_of(st.none(), st.integers(0, high + 10)))
        for p, (low, high) in marks.items()
    }
    expected = sum(
        len(range(max(low, committed[p] if committed[p] is not None else low), high))
        for p, (low, high) in marks.items()
    )
    assert topic_lag(marks, committed) == expected
    threshold = data.draw(st.integers(0, 2 * 10**6))
    result = kafka_lag_result("t", marks, committed, threshold)
    assert result.passed == (expected <= threshold)


def test_staleness_is_zero_when_everything_landed_is_modelled_and_fails_past_the_threshold():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    fresh = Staleness(True, 0, None, now)
    assert staleness_result(fresh, 120).passed
    stale = Staleness(True, 3, now - dt.timedelta(seconds=121), now)
    assert not staleness_result(stale, 120).passed
    assert staleness_result(Staleness(True, 3, now - dt.timedelta(seconds=60), now), 120).passed
    # never built, with ranges waiting: failing, whatever the threshold
    assert not staleness_result(Staleness(False, 1, now, now), 10**9).passed
    assert staleness_result(Staleness(False, 0, None, now), 0).passed


def _land(dsn: str, start: int, end: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        rng = OffsetRange("orders.events", 0, start, end)
        store.record_landing(conn, store.LedgerEntry(rng, end - start, end - start, 0, 0, "run", 1))


def test_staleness_reads_the_ranges_the_last_build_could_not_see(postgres_dsn):
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        store.ensure_schema(conn)
        empty = read_staleness(conn, "analytics")
        assert (empty.built, empty.unmodelled_ranges, empty.seconds) == (False, 0, 0.0)
    _land(postgres_dsn, 0, 10)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        never = read_staleness(conn, "analytics")
        assert (never.built, never.unmodelled_ranges) == (False, 1)
        # a build of order_status records the snapshot it read in, as the dbt pre-hook does
        conn.execute("create schema analytics")
        conn.execute(
            "create table analytics.incremental_runs (id bigint generated always as identity"
            " primary key, model text not null, started_at timestamptz not null,"
            " read_snapshot pg_snapshot not null, xact_id xid8 not null default"
            " pg_current_xact_id())"
        )
        conn.execute(
            "insert into analytics.incremental_runs (model, started_at, read_snapshot)"
            " values ('order_status', now(), pg_current_snapshot())"
        )
        assert read_staleness(conn, "analytics").unmodelled_ranges == 0
    _land(postgres_dsn, 10, 20)
    _land(postgres_dsn, 20, 30)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        staleness = read_staleness(conn, "analytics")
        assert staleness.built and staleness.unmodelled_ranges == 2
        first = conn.execute(
            "select landed_at from raw.ingest_ledger where start_offset = 10"
        ).fetchone()[0]
        assert staleness.oldest_unmodelled_at == first
        # another model's snapshot says nothing about order_status
        conn.execute(
            "insert into analytics.incremental_runs (model, started_at, read_snapshot)"
            " values ('order_events', now(), pg_current_snapshot())"
        )
        assert read_staleness(conn, "analytics").unmodelled_ranges == 2
        conn.execute(
            "insert into analytics.incremental_runs (model, started_at, read_snapshot)"
            " values ('order_status', now(), pg_current_snapshot())"
        )
        assert read_staleness(conn, "analytics").unmodelled_ranges == 0
