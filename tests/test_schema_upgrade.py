"""A database landed by the previous release takes the current schema in place and lands on."""

from __future__ import annotations

from pathlib import Path

import psycopg

from orderflow_dagster.ingest.producer import EventProducer, emit_event
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.planner import plan_ranges
from tests.support import scratch_database

# raw/audit schema as released in 0aa65f3, with its first-seen table and the
# audit function whose parameters the current one must replace, not trip over
PREVIOUS_SCHEMA = Path(__file__).parent / "fixtures" / "schema-0aa65f3.sql"
EVENT_ID = "6f03675a-1600-435a-8999-50d836f675cc"  # a v4 id, as older producers minted them


def test_a_database_landed_by_the_previous_release_upgrades_in_place_and_lands_on(
    kafka_bootstrap, postgres_dsn, topic
):
    with scratch_database(postgres_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(PREVIOUS_SCHEMA.read_text())
        # what the previous release left: a landed event, its first-seen row, its audit row
        with conn.transaction():
            conn.execute(
                "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
                " aggregate_id, event_type, schema_version, event_ts_ms, payload, run_id)"
                " values ('legacy.events', 0, 0, %s, 'ord-1', 'OrderCancelled', 1, 0,"
                " '{\"reason\": \"r\"}', 'old-run')",
                (EVENT_ID,),
            )
            conn.execute("select audit.log_landing('legacy.events', 0, 0, 1, 'old-run', 'k')")
        store.ensure_schema(conn)
        assert conn.execute("select to_regclass('raw.event_first_seen')").fetchone()[0] is None
        with EventProducer(kafka_bootstrap, topic=topic) as producer:
            emit_event(
                "ord-1",
                "OrderCancelled",
                {"reason": "r"},
                event_id=EVENT_ID,
                topic=topic,
                producer=producer,
            )  # a late copy, after the upgrade
            emit_event("ord-2", "OrderCancelled", {"reason": "r"}, topic=topic, producer=producer)
        consumer = kafka_source.open_consumer(kafka_bootstrap, "upgrade-test")
        try:
            plan = plan_ranges(conn, consumer, topic, max_events_per_batch=100, max_inflight=10)
            for rng in plan.unlanded:
                land_range(rng, conn=conn, consumer=consumer, run_id="new-run")
        finally:
            consumer.close()
        outcomes = conn.execute(
            "select e.event_id::text = %s, a.outcome from audit.ingest_log a"
            " join raw.order_events e using (topic, kafka_partition, kafka_offset)"
            " order by a.logged_at, a.topic",
            (EVENT_ID,),
        ).fetchall()
    # the old audit row stays; the copy landed after the upgrade is told apart from it
    assert sorted(outcomes) == [(False, "landed"), (True, "duplicate"), (True, "landed")]
