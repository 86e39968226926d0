"""Recovery scenarios against the real broker and Postgres: lost offsets, full replays,
repeated kills of catch-up, a crash right after the Kafka commit."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from orderflow_dagster.ingest.errors import OffsetsLostError
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import OffsetRange
from tests.support import Invariants, invariants, produce_orders, table_checksums
from tests.test_catch_up import cli
from tests.test_landing import GROUP, connections

BIN = Path(sys.executable).parent


@pytest.fixture
def env(cli_env):
    return cli_env(group=GROUP, max_events_per_batch=100)


def silently_skipped(conn, consumer, rng: OffsetRange, lost_end: int) -> int:
    """How many of the offsets [rng.start, lost_end) that retention removed were passed over
    silently: covered by a ledger range, or behind the group's committed offset, as if landed.

    Scenario 10's "lost" in the fault table: the records are gone from Kafka either way, so the
    guarantee is that their loss is loud (an error, nothing marked as done), not that they land.
    """
    covered = conn.execute(
        "select count(*) from raw.ingest_ledger where topic = %s and kafka_partition = %s"
        " and start_offset < %s and end_offset > %s",
        (rng.topic, rng.partition, lost_end, rng.start),
    ).fetchone()[0]
    committed = kafka_source.committed(consumer, rng.topic, [rng.partition])[rng.partition]
    passed = committed is not None and committed > rng.start
    return lost_end - rng.start if covered or passed else 0


@pytest.mark.faults
def catch_up_and_record(
    env: dict, produced: int, fault_report, scenario: str, since: float | None = None
) -> Invariants:
    """The recovery: a catch-up run; records the scenario's trial, timed from `since` (default:
    the catch-up's start), and returns the invariants for the test to assert."""
    started = time.monotonic() if since is None else since
    cli("catch-up", "--no-dbt", env=env)
    with connections(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_POSTGRES_DSN"]) as (
        conn,
        consumer,
    ):
        inv = invariants(conn, consumer, env["ORDERFLOW_TOPIC"], produced)
    fault_report.record_invariants(scenario, inv, recovery_s=time.monotonic() - started)
    return inv


def test_offsets_deleted_before_they_landed_fail_loudly_instead_of_being_skipped(
    kafka_bootstrap, postgres_dsn, topic, fault_report
):
    produced = produce_orders(kafka_bootstrap, topic, 100)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.size > 5)
        # retention (here: DeleteRecords) removes the head of the partition before it lands
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        futures = admin.delete_records([TopicPartition(topic, victim.partition, victim.start + 5)])
        for future in futures.values():
            future.result(timeout=30)
        # no recovery is possible: the recovery time is how long the landing takes to fail
        attempt = time.monotonic()
        with pytest.raises(OffsetsLostError):
            land_range(victim, conn=conn, consumer=consumer, run_id="after-retention")
        fault_report.record(
            "10. offsets lost before landing: loud failure",
            messages=len(produced),
            lost=silently_skipped(conn, consumer, victim, victim.start + 5),
            duplicated=invariants(conn, consumer, topic, len(produced)).duplicated,
            recovery_s=time.monotonic() - attempt,
        )
        landed = conn.execute(
            "select count(*) from raw.order_events where topic = %s and kafka_partition = %s",
            (topic, victim.partition),
        ).fetchone()[0]
        assert landed == 0  # nothing of the range was written, and nothing was skipped silently
        assert kafka_source.committed(consumer, topic, [victim.partition])[victim.partition] is None


@pytest.mark.faults
def test_the_landing_asset_fails_without_retries_when_offsets_are_lost(env, topic, fault_report):
    first = produce_orders(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], topic, 60)
    admin = AdminClient({"bootstrap.servers": env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"]})
    for future in admin.delete_records([TopicPartition(topic, 0, 3)]).values():
        future.result(timeout=30)
    # the planner starts a never-planned partition at its low watermark, so lose offsets after
    # the plan exists: plan first, then delete
    cli("catch-up", "--no-dbt", env=env)  # lands everything from the new low watermarks
    second = produce_orders(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], topic, 60, seed=2)
    with connections(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_POSTGRES_DSN"]) as (
        conn,
        consumer,
    ):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.partition == 0)
    for future in admin.delete_records([TopicPartition(topic, 0, victim.start + 1)]).values():
        future.result(timeout=30)
    # no recovery is possible: the recovery time is how long catch-up takes to fail
    attempt = time.monotonic()
    failed = cli("catch-up", "--no-dbt", env=env, check=False)
    with connections(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_POSTGRES_DSN"]) as (
        conn,
        consumer,
    ):
        fault_report.record(
            "10. offsets lost before landing: loud failure",
            messages=len(first) + len(second),
            lost=silently_skipped(conn, consumer, victim, victim.start + 1),
            duplicated=invariants(conn, consumer, topic, len(first) + len(second)).duplicated,
            recovery_s=time.monotonic() - attempt,
        )
    assert failed.returncode == 1
    assert "no longer in Kafka" in failed.stdout + failed.stderr


@pytest.mark.faults
def test_a_full_replay_from_earliest_leaves_the_tables_unchanged(env, topic, fault_report):
    produced = produce_orders(
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], topic, 200, poison_rate=0.03
    )
    cli("catch-up", "--no-dbt", env=env)
    with connections(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_POSTGRES_DSN"]) as (
        conn,
        consumer,
    ):
        before = table_checksums(conn, topic)
        replay = time.monotonic()
        # an operator resets the consumer group to the earliest offsets
        parts = kafka_source.partitions(consumer, topic)
        kafka_source.commit(consumer, topic, {p: 0 for p in parts})
        # and re-lands every range ever landed, as a replay would
        spans = conn.execute(
            "select partition_key from raw.ingest_ledger where topic = %s", (topic,)
        ).fetchall()
        for (key,) in spans:
            land_range(OffsetRange.from_key(key), conn=conn, consumer=consumer, run_id="replay")
    inv = catch_up_and_record(
        env, len(produced), fault_report, "8. full replay from earliest", replay
    )
    inv.assert_exactly_once()
    with connections(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_POSTGRES_DSN"]) as (
        conn,
        _,
    ):
        assert table_checksums(conn, topic) == before


@pytest.mark.faults
def test_catch_up_killed_at_random_moments_many_times_still_lands_everything_once(
    env, topic, fault_report
):
    produced = produce_orders(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], topic, 400)
    rng = random.Random(7)
    for _ in range(6):
        proc = subprocess.Popen(
            [str(BIN / "orderflow"), "catch-up", "--no-dbt"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(1.5, 6.0))
        proc.kill()
        proc.wait()
    scenario = "2. catch-up SIGKILLed 6x at random"
    catch_up_and_record(env, len(produced), fault_report, scenario).assert_exactly_once()


@pytest.mark.faults
def test_a_crash_right_after_the_kafka_commit_needs_no_repair(env, topic, fault_report):
    produced = produce_orders(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], topic, 50)
    crashing = {**env, "ORDERFLOW_CRASH_AT": "after_kafka_commit"}
    proc = subprocess.run(
        [str(BIN / "orderflow"), "catch-up", "--no-dbt"],
        env=crashing,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9
    scenario = "1. SIGKILL at after_kafka_commit"
    catch_up_and_record(env, len(produced), fault_report, scenario).assert_exactly_once()
