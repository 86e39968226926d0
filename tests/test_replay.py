"""Replaying dead letters: the size limit an operator raised applies, and the dbt sensor sees the
replay. Real Kafka, Postgres and Dagster instance."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from confluent_kafka.admin import NewTopic
from dagster import DagsterInstance, RunRequest, build_sensor_context

from orderflow_dagster.defs.launch import dbt_build_decision, raw_marker
from orderflow_dagster.defs.resources import PostgresResource
from orderflow_dagster.defs.sensors import dbt_after_landing_sensor
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.landing import DEFAULT_MAX_MESSAGE_BYTES, land_range
from orderflow_dagster.land.parse import Reason
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.serve.dlq import replay
from orderflow_dagster.stack import manager
from tests.support import orderflow

# above the default limit, and above what Kafka's defaults let a topic hold
BIG = DEFAULT_MAX_MESSAGE_BYTES + 100_000


def cancelled(reason: str) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "aggregate_id": f"ord-{uuid.uuid4().hex[:8]}",
        "event_type": "OrderCancelled",
        "payload": {"reason": reason},
        "timestamp": 1_735_689_600_000,
        "schema_version": 1,
    }


def test_a_letter_over_the_default_limit_is_replayed_once_the_limit_is_raised(
    kafka_bootstrap, postgres_dsn, cli_env
):
    topic = f"orders.events.big-{uuid.uuid4().hex[:8]}"
    admin = manager.admin_client(kafka_bootstrap)
    config = {"max.message.bytes": str(4 * BIG)}
    for future in admin.create_topics([NewTopic(topic, 1, 1, config=config)]).values():
        future.result()
    big, small = cancelled("x" * BIG), cancelled("fine")
    with EventProducer(
        kafka_bootstrap, topic=topic, extra={"message.max.bytes": 4 * BIG}
    ) as producer:
        for event in (big, small):
            producer.produce_raw(json.dumps(event).encode(), event["aggregate_id"].encode())
    env = cli_env(group=f"big-{topic}", max_events_per_batch=100, ORDERFLOW_TOPIC=topic)
    orderflow("catch-up", "--no-dbt", env=env)
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(
            "select reason from raw.dead_letters where topic = %s", (topic,)
        ).fetchall() == [(Reason.OVERSIZE,)]

    # at the limit it was dead-lettered under, it stays a dead letter
    unchanged = orderflow("dlq", "replay", "--reason", Reason.OVERSIZE, env=env)
    assert "replayed 0; still invalid 1" in unchanged.stdout
    raised = {**env, "ORDERFLOW_MAX_MESSAGE_BYTES": str(2 * BIG)}
    fixed = orderflow("dlq", "replay", "--reason", Reason.OVERSIZE, env=raised)
    assert "replayed 1; still invalid 0" in fixed.stdout

    with psycopg.connect(postgres_dsn) as conn:
        landed = conn.execute(
            "select event_id::text, length(payload ->> 'reason') from raw.order_events"
            " where topic = %s order by kafka_offset",
            (topic,),
        ).fetchall()
        outcomes = conn.execute(
            "select outcome, count(*) from audit.ingest_log where topic = %s group by 1 order by 1",
            (topic,),
        ).fetchall()
        log = conn.execute(
            "select rows_replayed, still_invalid from raw.replay_log where topic = %s"
            " order by replay_id",
            (topic,),
        ).fetchall()
    assert landed == [(big["event_id"], BIG), (small["event_id"], 4)]
    assert outcomes == [("dead_lettered", 1), ("landed", 1), ("replayed", 1)]
    assert log == [(0, 1), (1, 0)]


def tick(instance: DagsterInstance, dsn: str, cursor: str | None):
    """One evaluation of the real dbt sensor, as the daemon runs it: real instance, resources."""
    context = build_sensor_context(
        instance=instance, cursor=cursor, resources={"postgres": PostgresResource(dsn=dsn)}
    )
    return dbt_after_landing_sensor.evaluate_tick(context)


def test_the_dbt_sensor_requests_a_build_after_a_replay_and_only_then(
    kafka_bootstrap, postgres_dsn, topic
):
    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        for event in (cancelled("y" * 500), cancelled("z")):
            producer.produce_raw(json.dumps(event).encode(), b"one-partition", 0)
    postgres = PostgresResource(dsn=postgres_dsn)
    consumer = kafka_source.open_consumer(kafka_bootstrap, f"sensor-{topic}")
    try:
        with postgres.connect() as conn:
            plan = plan_ranges(conn, consumer, topic, max_events_per_batch=100, max_inflight=4)
            for rng in plan.unlanded:
                land_range(rng, conn=conn, consumer=consumer, run_id="small", max_message_bytes=300)
    finally:
        consumer.close()

    with DagsterInstance.ephemeral() as instance:
        landed = tick(instance, postgres_dsn, None)
        assert [type(r) for r in landed.run_requests] == [RunRequest]
        quiet = tick(instance, postgres_dsn, landed.cursor)
        assert quiet.run_requests == [] and "nothing landed or replayed" in quiet.skip_message

        with postgres.connect() as conn:
            report = replay(conn, topic=topic, reason=Reason.OVERSIZE, max_message_bytes=10_000)
        assert len(report.replayed) == 1
        replayed = tick(instance, postgres_dsn, quiet.cursor)
        assert [type(r) for r in replayed.run_requests] == [RunRequest]
        assert replayed.cursor != landed.cursor
        assert tick(instance, postgres_dsn, replayed.cursor).run_requests == []

        # a replay that lands nothing changes nothing dbt reads: no build
        with postgres.connect() as conn:
            assert replay(conn, topic=topic, reason=Reason.OVERSIZE).replayed == []
        assert tick(instance, postgres_dsn, replayed.cursor).run_requests == []


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_raw_marker_moves_with_every_landing_and_every_replay_that_landed_rows():
    ledger_only = raw_marker(3, T0, 0, None)
    assert ledger_only == f"3:{T0.isoformat()}"  # the form cursors had before replays counted
    assert raw_marker(0, None, 0, None) == "0:-"
    markers = {
        ledger_only,
        raw_marker(4, T0 + timedelta(seconds=1), 0, None),
        raw_marker(3, T0, 1, T0 + timedelta(seconds=2)),
        raw_marker(3, T0, 2, T0 + timedelta(seconds=3)),
        raw_marker(4, T0 + timedelta(seconds=1), 2, T0 + timedelta(seconds=3)),
    }
    assert len(markers) == 5


@pytest.mark.parametrize(
    ("count", "marker", "cursor", "running", "builds"),
    [
        (0, "0:-", None, False, False),
        (3, raw_marker(3, T0, 0, None), None, False, True),
        (3, raw_marker(3, T0, 0, None), raw_marker(3, T0, 0, None), False, False),
        # a replay after the last build: a build, unless one runs already
        (4, raw_marker(3, T0, 1, T0), raw_marker(3, T0, 0, None), False, True),
        (4, raw_marker(3, T0, 1, T0), raw_marker(3, T0, 0, None), True, False),
    ],
)
def test_the_dbt_build_decision_follows_the_marker(count, marker, cursor, running, builds):
    decision = dbt_build_decision(count, marker, cursor, dbt_in_progress=running)
    assert (decision is None) == builds, decision
