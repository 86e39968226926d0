"""A Kafka topic deleted and created again, against the real broker, Postgres and dbt: its new
incarnation lands whole as a stream of its own, what the old one took with it is reported lost,
and a log that ends below the ledger stops everything with what to do."""

from __future__ import annotations

import time

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from dagster import DagsterInstance, SensorResult, build_sensor_context
from psycopg import sql

from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.incarnations import LogBehindLedgerError, TopicRecreatedError
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import OffsetRange
from orderflow_dagster.serve.catch_up import EXIT_TOPIC_INCARNATION
from orderflow_dagster.stack import manager
from tests.support import invariants, mart_duplicates, orderflow, produce
from tests.test_landing import connections

PARTITIONS = 4


def events(count: int, seed: int) -> list:
    """`count` clean messages (no poison, no re-sends), spread over the topic's partitions."""
    outgoing = list(
        generate(count, seed=seed, duplicate_rate=0, poison_rate=0, num_partitions=PARTITIONS)
    )
    return outgoing[:count]


def recreate(bootstrap: str, topic: str) -> None:
    """Delete the topic and create it again under the same name (a new topic id)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic], request_timeout=30)[topic].result()
    deadline = time.monotonic() + 60
    while topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} still listed after deletion"
        time.sleep(0.2)
    while True:
        try:
            manager.ensure_topics(bootstrap, {topic: PARTITIONS})
            return
        except manager.StackError:  # still being deleted on the broker
            assert time.monotonic() < deadline, f"{topic} could not be created again"
            time.sleep(0.5)


def sensor_tick(env: dict[str, str]):
    """One evaluation of the planning sensor, with the resources a deployment gives it."""
    from orderflow_dagster.defs.resources import KafkaResource, LandingSettings, PostgresResource
    from orderflow_dagster.defs.sensors import kafka_offset_ranges_sensor

    context = build_sensor_context(
        instance=DagsterInstance.ephemeral(),
        resources={
            "kafka": KafkaResource(
                bootstrap_servers=env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
                topic=env["ORDERFLOW_TOPIC"],
                consumer_group=env["ORDERFLOW_CONSUMER_GROUP"],
            ),
            "postgres": PostgresResource(dsn=env["ORDERFLOW_POSTGRES_DSN"]),
            "landing": LandingSettings(
                max_events_per_batch=int(env["ORDERFLOW_MAX_EVENTS_PER_BATCH"]), max_inflight=100
            ),
        },
    )
    return kafka_offset_ranges_sensor(context)


def stored(conn: psycopg.Connection, stream: str) -> int:
    return conn.execute(
        "select (select count(*) from raw.order_events where topic = %s)"
        " + (select count(*) from raw.dead_letters where topic = %s)",
        (stream, stream),
    ).fetchone()[0]


def landed_coordinates(conn: psycopg.Connection, stream: str) -> set[tuple[int, int]]:
    return {
        (p, o)
        for p, o in conn.execute(
            "select kafka_partition, kafka_offset from raw.order_events where topic = %s",
            (stream,),
        )
    }


def services(env: dict[str, str]):
    """A connection and a consumer of the test's group, as the CLI's own."""
    return connections(
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
        env["ORDERFLOW_POSTGRES_DSN"],
        env["ORDERFLOW_CONSUMER_GROUP"],
    )


@pytest.fixture
def env(cli_env, topic):
    return cli_env(group=f"incarnation-{topic}", max_events_per_batch=4)


@pytest.mark.faults
def test_a_deleted_and_re_created_topic_lands_whole_as_a_stream_of_its_own(
    env, topic, kafka_bootstrap, fault_report
):
    first = events(25, seed=1)
    produce(kafka_bootstrap, topic, first)
    orderflow("catch-up", "--no-dbt", env=env)
    with services(env) as (conn, consumer):
        old_id = kafka_source.topic_id(consumer, topic)
        old_rows = landed_coordinates(conn, topic)
    assert len(old_rows) == 25

    recreate(kafka_bootstrap, topic)
    recovery = time.monotonic()
    # fewer records than the old incarnation had: every partition's log ends below its ledger
    fewer = events(10, seed=2)
    produce(kafka_bootstrap, topic, fewer)
    tick = sensor_tick(env)
    with services(env) as (conn, consumer):
        new_id = kafka_source.topic_id(consumer, topic)
        stream = f"{topic}@{new_id}"
        assert new_id != old_id
        planned = store.topic_progress(conn, stream).planned
    # the tick planned the new incarnation from its first offset, under its own partition keys
    assert isinstance(tick, SensorResult)
    keys = sorted(r.partition_key for r in tick.run_requests)
    assert keys and all(OffsetRange.from_key(k).topic == stream for k in keys)
    assert {p: min(r.start for r in rs) for p, rs in planned.items()} == {p: 0 for p in planned}
    assert sum(r.size for rs in planned.values() for r in rs) == len(fewer)

    # and then more than the old incarnation had: the new log passes the old ledger's ends
    more = events(40, seed=3)
    produce(kafka_bootstrap, topic, more)
    done = orderflow("catch-up", env=env)
    assert "lag:          0" in done.stdout
    assert f"landed as stream {stream}" in done.stdout
    ok = orderflow("verify", env=env)
    assert "FAIL" not in ok.stdout, ok.stdout
    assert "ok    topic ids match the ledger" in ok.stdout
    assert "ok    nothing lost to a re-created topic" in ok.stdout

    with services(env) as (conn, consumer):
        new = invariants(conn, consumer, stream, len(fewer) + len(more))
        new.assert_exactly_once()
        # the old incarnation's rows are untouched, under the bare name
        assert landed_coordinates(conn, topic) == old_rows
        assert stored(conn, topic) == len(first)
        assert (
            conn.execute(
                "select count(*) from raw.ingest_ledger where topic = %s and topic_id <> %s",
                (stream, new_id),
            ).fetchone()[0]
            == 0
        )
        # the marts hold every event of both incarnations, once
        in_marts = conn.execute(
            sql.SQL("select count(distinct event_id) from {}").format(
                sql.Identifier("analytics", "order_events")
            )
        ).fetchone()[0]
        twice = mart_duplicates(conn)
        fault_report.record(
            "14. topic deleted and re-created",
            messages=len(first) + len(fewer) + len(more),
            lost=len(first) - len(old_rows) + new.lost,
            duplicated=new.duplicated + twice,
            recovery_s=time.monotonic() - recovery,
        )
        assert in_marts == len(first) + len(fewer) + len(more)
        assert twice == 0


def test_ranges_of_the_old_incarnation_are_refused_and_their_offsets_reported_until_acknowledged(
    env, topic, kafka_bootstrap
):
    produce(kafka_bootstrap, topic, events(30, seed=4))
    with services(env) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=3, max_inflight=1)
        landed = plan.unlanded[0]
        land_range(landed, conn=conn, consumer=consumer, run_id="before")
        orphan = plan.unlanded[1]
        old_id = kafka_source.topic_id(consumer, topic)

    recreate(kafka_bootstrap, topic)
    again = events(12, seed=5)
    produce(kafka_bootstrap, topic, again)
    with services(env) as (conn, consumer):
        # the landing refuses a range of the incarnation Kafka no longer has, with what to do
        with pytest.raises(TopicRecreatedError) as refused:
            land_range(orphan, conn=conn, consumer=consumer, run_id="after")
        assert "deleted and re-created" in str(refused.value)
        assert "orderflow ack-loss" in str(refused.value)
        assert stored(conn, topic) == landed.size

    failed = orderflow("catch-up", "--no-dbt", env=env, check=False)
    assert failed.returncode == EXIT_TOPIC_INCARNATION, failed.stdout + failed.stderr
    assert "lag:          0" in failed.stdout
    assert "never landed before the topic was re-created" in failed.stderr
    bad = orderflow("verify", env=env, check=False)
    assert bad.returncode == 1
    assert "ok    topic ids match the ledger" in bad.stdout
    assert "FAIL  nothing lost to a re-created topic" in bad.stdout

    with services(env) as (conn, consumer):
        new_id = kafka_source.topic_id(consumer, topic)
        invariants(conn, consumer, f"{topic}@{new_id}", len(again)).assert_exactly_once()
        # what was lost: everything the old incarnation had in Kafka (planning saw all 30
        # offsets) but the range that landed, the refused range among it
        lost = planned_or_seen_lost(conn, topic)
        lost_offsets = {(r.partition, o) for r in lost for o in range(r.start, r.end)}
        assert len(lost_offsets) == 30 - landed.size
        assert {(orphan.partition, o) for o in range(orphan.start, orphan.end)} <= lost_offsets
    # the operator acknowledges them with the command the refusal names: a dry run first,
    # then --yes; the old stream is the bare topic name, the records it lost are all gone
    dry = orderflow("ack-loss", "--topic", topic, "--reason", "topic re-created", env=env)
    assert f"would acknowledge {len(lost_offsets)} offset(s)" in dry.stdout, dry.stdout
    with services(env) as (conn, consumer):
        assert (
            conn.execute(
                "select count(*) from raw.ingest_ledger where acknowledged_loss is not null"
            ).fetchone()[0]
            == 0
        )
    done = orderflow("ack-loss", "--topic", topic, "--reason", "topic re-created", "--yes", env=env)
    assert f"acknowledged {len(lost_offsets)} offset(s)" in done.stdout, done.stdout
    with services(env) as (conn, consumer):
        # its ledger rows carry the old stream's topic id (the ledger fills it in)
        assert (
            conn.execute(
                "select count(*) from raw.ingest_ledger where acknowledged_loss is not null"
                " and topic_id is distinct from %s",
                (old_id,),
            ).fetchone()[0]
            == 0
        )
        assert planned_or_seen_lost(conn, topic) == []
    assert orderflow("verify", env=env).returncode == 0
    assert orderflow("catch-up", "--no-dbt", env=env).returncode == 0


def planned_or_seen_lost(conn: psycopg.Connection, topic: str) -> list[OffsetRange]:
    from orderflow_dagster.land.planner import lost_to_recreation

    (stream,) = conn.execute(
        "select stream from raw.topic_incarnations where topic = %s order by seq desc limit 1",
        (topic,),
    ).fetchone()
    return lost_to_recreation(conn, topic, stream)


def test_a_log_below_the_ledger_stops_everything_until_an_operator_starts_a_new_stream(
    env, topic, kafka_bootstrap
):
    first = events(25, seed=6)
    produce(kafka_bootstrap, topic, first)
    orderflow("catch-up", "--no-dbt", env=env)
    recreate(kafka_bootstrap, topic)
    fewer = events(10, seed=7)
    produce(kafka_bootstrap, topic, fewer)
    with services(env) as (conn, consumer):
        # what a ledger landed before topic ids were recorded looks like: no incarnation, no ids
        conn.execute("delete from raw.topic_incarnations where topic = %s", (topic,))
        conn.execute("update raw.ingest_ledger set topic_id = null where topic = %s", (topic,))
        conn.execute("update raw.ingest_plan set topic_id = null where topic = %s", (topic,))
        before = kafka_source.committed(consumer, topic, list(range(PARTITIONS)))

    with pytest.raises(LogBehindLedgerError) as stopped:
        sensor_tick(env)
    assert "orderflow catch-up --new-stream" in str(stopped.value)
    failed = orderflow("catch-up", "--no-dbt", env=env, check=False)
    assert failed.returncode == EXIT_TOPIC_INCARNATION, failed.stdout + failed.stderr
    assert "ends below the ledger of stream" in failed.stderr
    assert "lag=-" not in failed.stdout + failed.stderr
    bad = orderflow("verify", env=env, check=False)
    assert bad.returncode == 1
    assert "FAIL  ledger within Kafka's log" in bad.stdout
    with services(env) as (conn, consumer):
        # nothing was committed above the new log's end, nothing planned around it
        assert kafka_source.committed(consumer, topic, list(range(PARTITIONS))) == before
        assert stored(conn, topic) == len(first)

    restarted = orderflow("catch-up", "--no-dbt", "--new-stream", env=env)
    assert "lag:          0" in restarted.stdout
    assert orderflow("verify", env=env).returncode == 0
    with services(env) as (conn, consumer):
        new_id = kafka_source.topic_id(consumer, topic)
        invariants(conn, consumer, f"{topic}@{new_id}", len(fewer)).assert_exactly_once()
    # and the decision is not taken twice
    refused = orderflow("catch-up", "--no-dbt", "--new-stream", env=env, check=False)
    assert refused.returncode == EXIT_TOPIC_INCARNATION
    assert "refusing to start a new stream" in refused.stderr


def test_a_committed_offset_past_the_log_end_is_replaced_never_shown_as_negative_lag(
    env, topic, kafka_bootstrap
):
    produce(kafka_bootstrap, topic, events(20, seed=8))
    orderflow("catch-up", "--no-dbt", env=env)
    with services(env) as (_, consumer):
        parts = list(range(PARTITIONS))
        ends = kafka_source.committed(consumer, topic, parts)
        marks = kafka_source.watermarks(consumer, topic, parts)
        # a restored group, another tool, a hand: the group past the log end of one partition
        kafka_source.commit(consumer, topic, {0: marks[0][1] + 7})
    bad = orderflow("verify", env=env, check=False)
    assert "FAIL  ledger within Kafka's log" in bad.stdout
    done = orderflow("catch-up", "--no-dbt", env=env)
    assert "lag:          0" in done.stdout
    with services(env) as (_, consumer):
        assert kafka_source.committed(consumer, topic, parts) == ends
    assert orderflow("verify", env=env).returncode == 0


def test_verify_fails_when_the_ledger_holds_another_topic_id_than_kafka(
    env, topic, kafka_bootstrap
):
    produce(kafka_bootstrap, topic, events(12, seed=9))
    orderflow("catch-up", "--no-dbt", env=env)
    assert "ok    topic ids match the ledger" in orderflow("verify", env=env).stdout
    dsn = env["ORDERFLOW_POSTGRES_DSN"]
    other = "AAAAAAAAAAAAAAAAAAAAAQ"
    with psycopg.connect(dsn, autocommit=True) as conn:
        # one ledger row recorded under another incarnation than its stream's
        conn.execute(
            "update raw.ingest_ledger set topic_id = %s where ctid = (select ctid from"
            " raw.ingest_ledger where topic = %s limit 1)",
            (other, topic),
        )
    bad = orderflow("verify", env=env, check=False)
    assert bad.returncode == 1
    assert "FAIL  topic ids match the ledger" in bad.stdout
    assert "1 plan/ledger row(s) carry another topic id" in bad.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("update raw.ingest_ledger set topic_id = null where topic_id = %s", (other,))
        # the whole ledger from another incarnation than Kafka's (re-created, not planned since)
        conn.execute(
            "update raw.topic_incarnations set topic_id = %s where topic = %s", (other, topic)
        )
        conn.execute("update raw.ingest_ledger set topic_id = %s where topic = %s", (other, topic))
        conn.execute("update raw.ingest_plan set topic_id = %s where topic = %s", (other, topic))
    bad = orderflow("verify", env=env, check=False)
    assert bad.returncode == 1
    assert "FAIL  topic ids match the ledger" in bad.stdout
    assert "the topic was deleted and re-created" in bad.stdout
