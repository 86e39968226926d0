"""`orderflow verify` tells records lost to retention from offsets that never held one.

Each check is shown failing on the bad state it exists for (built through real Kafka where the
pipeline itself can reach it, by SQL on the scratch database otherwise) and passing on a healthy
one. A landing records the log start offset it saw; an offset missing below it was deleted
before it could land, one missing above it held no record (transaction markers, aborted
transactions, compaction)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from confluent_kafka import Producer

from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.ingest.kafka_config import admin_config, consumer_config, producer_config
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.serve.verify import loss_checks, mart_checks, storage_checks
from tests.support import produce_orders
from tests.test_ack_loss import delete_records
from tests.test_landing import GROUP, connections

COMPLETE = "ledger ranges complete"
SILENT = "no range lost records silently"


def checks(conn: psycopg.Connection, topic: str) -> dict:
    return {c.name: c for c in storage_checks(conn, topic) + loss_checks(conn, topic)}


def land_everything(conn, consumer, topic: str) -> None:
    plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
    for r in plan.unlanded:
        land_range(r, conn=conn, consumer=consumer, run_id="healthy")


def produce_in_transactions(bootstrap: str, topic: str) -> int:
    """Records on partition 0 in a committed, an aborted and a committed transaction: the log
    then holds offsets with no record a consumer reads (two commit markers, one abort marker,
    the aborted records). Returns how many records are read back."""
    values = [o.value for o in generate(6, seed=3, poison_rate=0.0, duplicate_rate=0.0)]
    producer = Producer(producer_config(bootstrap, extra={"transactional.id": str(uuid.uuid4())}))
    producer.init_transactions(30)
    read = 0
    for chunk, commit in ((values[:5], True), (values[5:8], False), (values[8:12], True)):
        producer.begin_transaction()
        for value in chunk:
            producer.produce(topic, value=value, partition=0)
        producer.flush(30)
        if commit:
            producer.commit_transaction(30)
            read += len(chunk)
        else:
            producer.abort_transaction(30)
    return read


def test_markers_and_aborted_records_leave_a_range_complete_but_a_deleted_row_does_not(
    kafka_bootstrap, postgres_dsn, topic
):
    read = produce_in_transactions(kafka_bootstrap, topic)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_everything(conn, consumer, topic)
        (stored,) = conn.execute(
            "select count(*) from raw.order_events where topic = %s", (topic,)
        ).fetchone()
        assert stored == read
        healthy = checks(conn, topic)
        assert healthy[COMPLETE].ok and healthy[SILENT].ok, healthy
        # 3 aborted records, 3 markers: offsets above the log start that held no record
        assert healthy[COMPLETE].detail.startswith("6 offset(s) Kafka had no record at")
        # a row removed by hand (a botched cleanup): above the log start, it would pass for a
        # marker, but its range's ledger row counts it
        conn.execute(
            "delete from raw.order_events where topic = %s and kafka_offset ="
            " (select max(kafka_offset) from raw.order_events where topic = %s)",
            (topic, topic),
        )
        broken = checks(conn, topic)
    assert not broken[COMPLETE].ok
    assert "1 range(s) hold fewer records than they landed" in broken[COMPLETE].detail
    assert broken[SILENT].ok  # nothing below a log start is missing


def test_a_landing_that_skipped_offsets_retention_deleted_fails_both_checks(
    kafka_bootstrap, postgres_dsn, topic
):
    produce_orders(kafka_bootstrap, topic, 60)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.size > 5)
        for r in plan.unlanded:
            if r != victim:
                land_range(r, conn=conn, consumer=consumer, run_id="healthy")
        assert all(c.ok for c in checks(conn, topic).values())
        delete_records(kafka_bootstrap, topic, victim.partition, victim.start + 3)
        # a consumer built around the guard, resetting to the earliest offset Kafka has, as an
        # auto.offset.reset=earliest override once did: the range lands without its first 3
        skipping = kafka_source.LandingConsumer(
            {**consumer_config(kafka_bootstrap, GROUP, extra={}), "auto.offset.reset": "earliest"},
            admin_config(kafka_bootstrap, extra={}),
        )
        try:
            landed = land_range(victim, conn=conn, consumer=skipping, run_id="skipping")
        finally:
            skipping.close()
        assert landed.messages_read == victim.size - 3
        result = checks(conn, topic)
    assert not result[COMPLETE].ok
    assert "miss 3 offset(s) below the log start" in result[COMPLETE].detail
    assert not result[SILENT].ok
    assert f"p{victim.partition} [{victim.start}, {victim.end})" in result[SILENT].detail


def ack_row(conn, topic: str, start: int, end: int, log_start: int) -> None:
    conn.execute(
        "insert into raw.ingest_ledger (topic, kafka_partition, start_offset, end_offset,"
        " partition_key, messages_read, rows_landed, dead_letters, already_landed, run_id,"
        " log_start_offset, acknowledged_loss) values (%s, 0, %s, %s, 'k', 0, 0, 0, 0,"
        " 'by-hand', %s, 'by hand')",
        (topic, start, end, log_start),
    )


def lost_rows(conn, topic: str, offsets: list[int]) -> None:
    for offset in offsets:
        conn.execute(
            "insert into audit.ingest_log (topic, kafka_partition, kafka_offset, outcome,"
            " reason, run_id, partition_key) values (%s, 0, %s, 'lost', 'by hand', 'by-hand',"
            " 'k')",
            (topic, offset),
        )


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("kafka_still_had_them", "though Kafka still had them"),
        ("a_record_is_stored_there", "holding records"),
        ("no_audit_rows", "1 with exactly their one `lost` audit row"),
        ("two_audit_rows_for_one_offset", "1 with exactly their one `lost` audit row"),
        ("an_audit_row_without_acknowledgement", "of 3 audited as lost"),
    ],
)
def test_an_unsound_acknowledgement_fails_the_silent_loss_check(
    kafka_bootstrap, postgres_dsn, topic, bad, expected
):
    produce_orders(kafka_bootstrap, topic, 20)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_everything(conn, consumer, topic)
        (end,) = conn.execute(
            "select max(end_offset) from raw.ingest_ledger where topic = %s and"
            " kafka_partition = 0",
            (topic,),
        ).fetchone()
        start = end + 10  # offsets never produced: nothing else judges them
        if bad == "a_record_is_stored_there":
            start = 0  # over landed records
        ack_row(conn, topic, start, start + 2, start + 1 if bad == "kafka_still_had_them" else 99)
        offsets = {
            "no_audit_rows": [start],
            "two_audit_rows_for_one_offset": [start, start, start + 1],
            "an_audit_row_without_acknowledgement": [start, start + 1, start + 5],
        }.get(bad, [start, start + 1])
        lost_rows(conn, topic, offsets)
        result = checks(conn, topic)[SILENT]
    assert not result.ok
    assert expected in result.detail, result.detail


def test_half_built_marts_fail_verify_and_none_or_both_pass(postgres_dsn):
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert [c.ok for c in mart_checks(conn, "analytics")] == [True]
        conn.execute("create schema analytics")
        conn.execute(
            "create table analytics.order_events"
            " (event_id uuid, order_id text, transformed_at timestamptz)"
        )
        (half,) = mart_checks(conn, "analytics")
        assert not half.ok and "order_status missing" in half.detail
        conn.execute("create table analytics.order_status (order_id text, updated_at timestamptz)")
        both = {c.name: c for c in mart_checks(conn, "analytics")}
        assert both["no event_id twice in the marts"].ok, both
        assert both["one order_status row per order"].ok, both
