"""The marts follow commit order, through real Kafka, Postgres and dbt.

- A landing transaction that began long before it committed (here: waiting on its partition's
  lock while other landings and dbt builds commit) still reaches every mart.
- A copy ordered earlier that commits later (here: a dead-letter replay waiting on a row lock)
  moves its event to another order: both orders, and their history, end up as a full refresh
  computes them, and the builds after keep passing.

Both compare the marts with tests/oracle.py over what raw holds, and with a full refresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from orderflow_dagster.ingest.envelope import ORDER_CREATED, PAYMENT_PROCESSED
from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range, repair_kafka_commits
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.serve.dlq import replay
from orderflow_dagster.serve.verify import mart_checks
from orderflow_dagster.transform.dbt import run_dbt_build
from tests.support import invariants, mart_duplicates
from tests.test_dbt_models import ANALYTICS, STAGING, assert_marts_match_oracle, snapshot_marts
from tests.test_landing import connections
from tests.test_schema_upgrade import PREVIOUS_SCHEMA

# The models read raw by commit order and ignore this var; a read by landed_at within this window
# of the newest copy modelled would pass over a landing that waited a few seconds.
TINY_LOOKBACK = {"landing_lookback": "1 second"}


@pytest.fixture
def marts_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schemas tests/test_dbt_models.py's oracle comparison reads."""
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", ANALYTICS)
    monkeypatch.setenv("ORDERFLOW_STAGING_SCHEMA", STAGING)


def raw_records(dsn: str) -> list[dict[str, Any]]:
    """Every raw row, as tests/oracle.py takes landed records."""
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            "select event_id::text, aggregate_id, event_type, payload, event_ts_ms as timestamp,"
            " schema_version, trace_id, topic, kafka_partition, kafka_offset, landed_at"
            " from raw.order_events"
        ).fetchall()


def marts_loss(dsn: str) -> tuple[int, int]:
    """(event_ids landed in raw but absent from order_events, event_ids twice in the marts)."""
    with psycopg.connect(dsn) as conn:
        absent = conn.execute(
            sql.SQL(
                "select count(distinct r.event_id) from raw.order_events r where not exists"
                " (select from {} e where e.event_id = r.event_id)"
            ).format(sql.Identifier(ANALYTICS, "order_events"))
        ).fetchone()[0]
        return absent, mart_duplicates(conn, ANALYTICS)


def assert_marts_exact(dsn: str) -> None:
    """The marts equal the oracle over raw, verify's mart checks pass, and a full refresh
    changes nothing (then the marts are rebuilt incrementally again by the caller's next build)."""
    assert_marts_match_oracle(dsn, raw_records(dsn))
    with psycopg.connect(dsn) as conn:
        failed = [c for c in mart_checks(conn, ANALYTICS) if not c.ok]
    assert not failed, failed
    incremental = snapshot_marts(dsn)
    run_dbt_build(dsn, full_refresh=True)
    assert snapshot_marts(dsn) == incremental


def wait_until_blocked(dsn: str, timeout: float = 60.0) -> None:
    """Until a backend of the database waits on a lock (the transaction a test holds back)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                "select count(*) from pg_stat_activity"
                " where datname = current_database() and wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError("nothing started waiting on the lock")


@contextmanager
def in_thread(target: Callable[[], Any]) -> Iterator[list]:
    """Run `target` in a thread; on exit, join it and re-raise what it raised. The list holds its
    result once joined."""
    outcome: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(timeout=300)
    if errors:
        raise errors[0]
    assert not thread.is_alive(), "the held transaction never finished"


@pytest.mark.faults
def test_a_landing_that_commits_long_after_it_began_reaches_every_mart(
    kafka_bootstrap, postgres_dsn, topic, fault_report, marts_env
):
    """A range waits on its partition's lock (another process holds it) far longer than
    TINY_LOOKBACK, while the other partitions land and dbt builds twice; then it commits. Its rows
    carry a landed_at older than everything modelled meanwhile: the next build models them."""
    # no copies across partitions: a copy landed meanwhile on another partition would make the
    # held landing start over (audit.settle_landing), in a new transaction, with a new landed_at
    outgoing = list(generate(160, seed=12, duplicate_rate=0.1, cross_partition_duplicate_share=0))
    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        for msg in outgoing:
            producer.produce_raw(msg.value, msg.key, msg.partition)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=40, max_inflight=100)
        held = next(r for r in plan.unlanded if r.partition == 0)
        meanwhile = [r for r in plan.unlanded if r.partition != 0]
        after = [r for r in plan.unlanded if r.partition == 0 and r != held]
        assert held.size > 0 and len(meanwhile) >= 2

        def land_held():
            with connections(kafka_bootstrap, postgres_dsn) as (own, own_consumer):
                return land_range(held, conn=own, consumer=own_consumer, run_id="held")

        # another process (a duplicate run, say) holds the partition's landing lock
        holder = psycopg.connect(postgres_dsn, autocommit=True)
        holder.execute(
            "select pg_advisory_lock(%s, hashtext(%s || '|' || %s::text))",
            (store.LOCK_LANDING, topic, held.partition),
        )
        with in_thread(land_held) as held_result:
            wait_until_blocked(postgres_dsn)  # its transaction, and so its landed_at, has begun
            time.sleep(2)  # longer than TINY_LOOKBACK
            half = len(meanwhile) // 2
            for rng in meanwhile[:half]:
                land_range(rng, conn=conn, consumer=consumer, run_id="meanwhile")
            run_dbt_build(postgres_dsn, dbt_vars=TINY_LOOKBACK)
            for rng in meanwhile[half:]:
                land_range(rng, conn=conn, consumer=consumer, run_id="meanwhile")
            run_dbt_build(postgres_dsn, dbt_vars=TINY_LOOKBACK)
            holder.close()  # the held landing gets the lock and commits
        assert held_result[0].rows_landed > 0
        for rng in after:
            land_range(rng, conn=conn, consumer=consumer, run_id="after")
        repair_kafka_commits(conn, consumer, topic)
        # the held rows are older than everything modelled meanwhile
        held_landed_at, meanwhile_landed_at = conn.execute(
            "select max(landed_at) filter (where run_id = 'held'),"
            " min(landed_at) filter (where run_id = 'meanwhile') from raw.order_events"
        ).fetchone()
        assert held_landed_at < meanwhile_landed_at

        recovery = time.monotonic()
        run_dbt_build(postgres_dsn, dbt_vars=TINY_LOOKBACK)
        recovery_s = time.monotonic() - recovery
        inv = invariants(conn, consumer, topic, len(outgoing))
    absent, twice = marts_loss(postgres_dsn)
    fault_report.record(
        "12. landing committed long after it began",
        messages=inv.produced,
        lost=inv.lost + absent,
        duplicated=inv.duplicated + twice,
        recovery_s=recovery_s,
    )
    inv.assert_exactly_once()
    assert (absent, twice) == (0, 0)
    assert_marts_exact(postgres_dsn)


def _copy(event: dict[str, Any], *, order_id: str, padding: int) -> bytes:
    """Another version of `event`: the same event_id, naming `order_id`, `padding` bytes longer."""
    payload = {**event["payload"], "note": "x" * padding}
    return orjson.dumps({**event, "aggregate_id": order_id, "payload": payload})


def _status(dsn: str, order_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            sql.SQL(
                "select status, event_count,"
                " (select count(*) from {} h where h.order_id = s.order_id)"
                " from {} s where order_id = %s"
            ).format(
                sql.Identifier(ANALYTICS, "order_status_history"),
                sql.Identifier(ANALYTICS, "order_status"),
            ),
            (order_id,),
        ).fetchone()


@pytest.mark.faults
def test_an_event_whose_winning_copy_moves_to_another_order_leaves_both_orders_exact(
    kafka_bootstrap, postgres_dsn, topic, fault_report, marts_env
):
    """Two events get a second version naming another order. Those versions first fail the
    landing's size limit and are dead-lettered; a replay with a higher limit begins, waits on a
    row lock, and commits only after the first versions have landed and been modelled. The
    replayed copies were landed first, so they win: one event leaves an order that has no other
    event (its status and history rows must go), one leaves an order that keeps others."""
    stream = [o for o in generate(60, seed=13, duplicate_rate=0, poison_rate=0) if o.event]
    by_order: dict[str, list] = {}
    for msg in stream:
        by_order.setdefault(msg.event["aggregate_id"], []).append(msg)
    full = [o for o, msgs in by_order.items() if len(msgs) >= 3]
    lone, losing, gaining = full[0], full[1], full[2]
    # `lone` keeps only its OrderCreated: once that moves, the order has no event left
    stream = [m for m in stream if m.event["aggregate_id"] != lone or m is by_order[lone][0]]
    lone_created = by_order[lone][0].event
    losing_payment = next(
        m.event for m in by_order[losing] if m.event["event_type"] == PAYMENT_PROCESSED
    )
    assert lone_created["event_type"] == ORDER_CREATED
    limit = max(len(m.value) for m in stream) + 100
    versions = [
        (_copy(lone_created, order_id="ord-moved-here", padding=limit), b"ord-moved-here"),
        (_copy(losing_payment, order_id=gaining, padding=limit), gaining.encode()),
    ]

    def land_everything(conn, consumer) -> None:
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=50, max_inflight=100)
        for rng in plan.unlanded:
            land_range(rng, conn=conn, consumer=consumer, run_id="land", max_message_bytes=limit)
        repair_kafka_commits(conn, consumer, topic)

    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        for value, key in versions:
            producer.produce_raw(value, key, 0)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_everything(conn, consumer)
        letters = conn.execute(
            "select topic, kafka_partition, kafka_offset from raw.dead_letters"
            " where reason = 'oversize'"
        ).fetchall()
        assert len(letters) == 2
        run_dbt_build(postgres_dsn)

        # an operator raises the limit and replays; the replay waits for a row lock
        holder = psycopg.connect(postgres_dsn)
        holder.execute(
            "select from raw.dead_letters where reason = 'oversize' for update"
        ).fetchall()

        def replay_versions():
            with psycopg.connect(postgres_dsn, autocommit=True) as own:
                return replay(own, topic=topic, coordinates=letters, max_message_bytes=10 * limit)

        with in_thread(replay_versions) as replayed:
            wait_until_blocked(postgres_dsn)  # the replay's transaction has begun
            with EventProducer(kafka_bootstrap, topic=topic) as producer:
                for msg in stream:
                    producer.produce_raw(msg.value, msg.key, msg.partition)
            land_everything(conn, consumer)
            run_dbt_build(postgres_dsn)
            assert _status(postgres_dsn, lone)[:2] == ("created", 1)
            assert _status(postgres_dsn, "ord-moved-here") is None
            holder.rollback()
            holder.close()
        assert len(replayed[0].replayed) == 2

        recovery = time.monotonic()
        run_dbt_build(postgres_dsn)
        recovery_s = time.monotonic() - recovery
    # the replayed versions won: the events moved
    assert _status(postgres_dsn, lone) is None
    assert _status(postgres_dsn, "ord-moved-here")[:2] == ("created", 1)
    assert_marts_exact(postgres_dsn)

    # later events of the orders involved keep building
    more = [
        o
        for o in generate(20, seed=14, duplicate_rate=0, poison_rate=0)
        if o.event and o.event["event_type"] != ORDER_CREATED
    ]
    involved = [losing, gaining, "ord-moved-here"]
    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        for n, msg in enumerate(more[:9]):
            event = {**msg.event, "aggregate_id": involved[n % 3]}
            producer.produce_raw(orjson.dumps(event), event["aggregate_id"].encode())
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_everything(conn, consumer)
        produced = sum(
            high - low
            for low, high in kafka_source.watermarks(consumer, topic, [0, 1, 2, 3]).values()
        )
        stored, coordinates_twice = conn.execute(
            "select count(*), count(*) - count(distinct (kafka_partition, kafka_offset)) from ("
            " select kafka_partition, kafka_offset from raw.order_events where topic = %(t)s"
            " union all select kafka_partition, kafka_offset from raw.dead_letters"
            " where topic = %(t)s and replayed_at is null) s",
            {"t": topic},
        ).fetchone()
    run_dbt_build(postgres_dsn)
    absent, twice = marts_loss(postgres_dsn)
    fault_report.record(
        "13. an event's winning copy moves to another order",
        messages=produced,
        lost=max(0, produced - stored) + absent,
        duplicated=coordinates_twice + twice,
        recovery_s=recovery_s,
    )
    assert (produced - stored, coordinates_twice, absent, twice) == (0, 0, 0, 0)
    assert_marts_exact(postgres_dsn)


def test_rows_landed_before_the_upgrade_get_a_commit_order_in_place_and_reach_the_marts(
    postgres_dsn, marts_env
):
    """The column every commit-order read relies on is added without rewriting raw (the rows
    already there share the migration's transaction id, committed before any build since), the
    schema applies again without error, and the next build models the old rows."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(PREVIOUS_SCHEMA.read_text())
        conn.execute(
            "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
            " aggregate_id, event_type, schema_version, event_ts_ms, payload, run_id)"
            " select 'legacy.events', 0, n, gen_random_uuid(), 'ord-' || n, 'OrderCancelled', 1,"
            " 0, '{\"reason\": \"r\"}', 'old-run' from generate_series(0, 99) n"
        )
        storage = conn.execute("select pg_relation_filenode('raw.order_events')").fetchone()[0]
        store.ensure_schema(conn)
        conn.execute(store.schema_sql())  # applied once more: every statement is idempotent
        assert conn.execute("select pg_relation_filenode('raw.order_events')").fetchone()[0] == (
            storage
        )
        assert conn.execute(
            "select count(*), count(distinct xact_id), count(xact_id) from raw.order_events"
        ).fetchone() == (100, 1, 100)
    run_dbt_build(postgres_dsn)
    assert_marts_match_oracle(postgres_dsn, raw_records(postgres_dsn))
