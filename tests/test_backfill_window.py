"""`orderflow backfill` against a real Dagster instance, Kafka and Postgres: the ranges of a window
of time (mapped with Kafka's offsets-for-times) or of offsets come back as partitions after
retention retired them, and re-landing them lands nothing twice."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from dagster import RunsFilter

from orderflow_dagster.defs.resources import PostgresResource, RetentionSettings
from orderflow_dagster.defs.retention import evaluate
from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.land import lifecycle
from orderflow_dagster.land.ranges import OffsetRange
from orderflow_dagster.serve.backfill import EXIT_REFUSED, EXIT_USAGE
from tests.support import invariants, orderflow, table_checksums
from tests.test_landing import connections
from tests.test_retention import dagster_instance, land, partitions, pipeline_resources, plan_tick

HOUR = 3600.0


def iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def produce_at(bootstrap: str, topic: str, outgoing: list, unix: float) -> None:
    """Produce `outgoing` with Kafka timestamps (CreateTime) from `unix` on, a millisecond apart."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i, msg in enumerate(outgoing):
        placed = {} if msg.partition is None else {"partition": msg.partition}
        producer.produce(
            topic, value=msg.value, key=msg.key, timestamp=int(unix * 1000) + i, **placed
        )
    assert producer.flush(30) == 0


def landed_batches(env, kafka_bootstrap, topic, tmp_path, stamps):
    """A Dagster instance in `tmp_path` (the DAGSTER_HOME of the CLI's environment) that landed
    one batch of orders per timestamp, each before the next, so each batch is a range of its
    own on every partition: (instance, resources, messages produced, each batch's range keys)."""
    instance = dagster_instance(tmp_path)
    resources = pipeline_resources(env, RetentionSettings())
    produced, keys = 0, []
    for i, unix in enumerate(stamps):
        batch = list(generate(20, seed=i + 1, num_partitions=4, poison_rate=0.05))
        produce_at(kafka_bootstrap, topic, batch, unix)
        todo = plan_tick(instance, resources)
        land(instance, resources, todo)
        produced += len(batch)
        keys.append(sorted(todo))
    return instance, resources, produced, keys


def range_on(keys: list[str], partition: int) -> OffsetRange:
    (found,) = [r for r in map(OffsetRange.from_key, keys) if r.partition == partition]
    return found


def retire_everything(instance, env) -> None:
    """A retention tick two hours on, with a retention of one hour: every landed range is due."""
    decision, _ = evaluate(
        instance,
        PostgresResource(dsn=env["ORDERFLOW_POSTGRES_DSN"]),
        RetentionSettings(retention_hours=1, max_partitions=0, max_per_tick=1000),
        None,
        now=time.time() + 2 * HOUR,
    )
    assert decision.retire
    assert partitions(instance) == set()


@pytest.fixture
def env(cli_env, topic):
    return cli_env(group=f"backfill-{topic}", max_events_per_batch=1000)


def test_a_time_window_backfill_of_retired_ranges_re_lands_nothing_twice_and_the_checksums_are_unchanged(  # noqa: E501
    env, topic, kafka_bootstrap, tmp_path
):
    now = time.time()
    stamps = [now - 3 * HOUR, now - 2 * HOUR, now - 1 * HOUR]
    instance, resources, produced, (first, middle, last) = landed_batches(
        env, kafka_bootstrap, topic, tmp_path, stamps
    )
    assert middle and not set(middle) & (set(first) | set(last))
    retire_everything(instance, env)
    dsn, group = env["ORDERFLOW_POSTGRES_DSN"], env["ORDERFLOW_CONSUMER_GROUP"]
    with connections(kafka_bootstrap, dsn, group) as (conn, _):
        before = table_checksums(conn, topic)
    window = ("--since", iso(stamps[1] - 0.5 * HOUR), "--until", iso(stamps[1] + 0.5 * HOUR))

    dry = orderflow("backfill", *window, env=env)
    for key in middle:
        assert f"{key}  landed          retired" in dry.stdout, dry.stdout
    assert "dry run: nothing changed" in dry.stdout
    assert partitions(instance) == set()

    done = orderflow("backfill", *window, "--yes", env=env)
    assert f"added {len(middle)} partition(s)" in done.stdout, done.stdout
    assert partitions(instance) == set(middle)
    # retention keeps what was re-added for a backfill, even beyond its count bound
    decision, _ = evaluate(
        instance,
        PostgresResource(dsn=dsn),
        RetentionSettings(retention_hours=1, max_partitions=1, max_per_tick=1000),
        None,
    )
    assert decision.retire == []
    assert decision.kept == {lifecycle.KEPT_READDED: len(middle)}

    # the backfill itself: every record of every range is there already
    landings = land(instance, resources, sorted(middle))
    for key, metadata in zip(sorted(middle), landings, strict=True):
        assert metadata["rows_landed"] == metadata["dead_letters"] == 0, metadata
        assert metadata["already_landed"] == OffsetRange.from_key(key).size, metadata
    with connections(kafka_bootstrap, dsn, group) as (conn, consumer):
        assert table_checksums(conn, topic) == before
        invariants(conn, consumer, topic, produced).assert_exactly_once()
    assert "FAIL" not in orderflow("verify", env=env).stdout

    # --launch submits the backfill the UI's dialog would (the daemon runs it)
    launched = orderflow("backfill", *window, "--yes", "--launch", env=env)
    backfill_id = launched.stdout.split("submitted backfill ")[1].split()[0]
    backfill = instance.get_backfill(backfill_id)
    assert backfill is not None and backfill.status.value == "REQUESTED"
    target = backfill.asset_backfill_data.target_subset
    (subset,) = target.partitions_subsets_by_asset_key.values()
    assert set(subset.get_partition_keys()) == set(middle)
    instance.dispose()


def test_an_offset_window_selects_the_ranges_sharing_an_offset_with_it(
    env, topic, kafka_bootstrap, tmp_path
):
    now = time.time()
    instance, _, _, (first, second) = landed_batches(
        env, kafka_bootstrap, topic, tmp_path, [now - 2 * HOUR, now]
    )
    retire_everything(instance, env)
    # the last offset of partition 1's first range, and the first of its second
    one = range_on(first, 1)
    offsets = ("--from-offset", str(one.end - 1), "--to-offset", str(one.end + 1))
    done = orderflow("backfill", "--partition", "1", *offsets, "--yes", env=env)
    expected = {k for k in first + second if OffsetRange.from_key(k).partition == 1}
    assert partitions(instance) == expected, done.stdout
    instance.dispose()


def test_windows_that_select_nothing_landed_or_cannot_be_mapped_are_refused_with_what_to_do(
    env, topic, kafka_bootstrap, tmp_path
):
    now = time.time()
    stamps = [now - 3 * HOUR, now - 2 * HOUR, now - 1 * HOUR]
    instance, _, _, (first, _, _) = landed_batches(env, kafka_bootstrap, topic, tmp_path, stamps)
    instance.dispose()

    def refused(*args: str, code: int = EXIT_REFUSED, **extra: str) -> str:
        proc = orderflow("backfill", *args, env={**env, **extra}, check=False)
        assert proc.returncode == code, (proc.stdout, proc.stderr)
        return proc.stderr

    later = refused("--since", iso(now + HOUR), "--until", iso(now + 2 * HOUR))
    assert "Kafka holds no record" in later
    beyond = refused("--from-offset", "100000", "--to-offset", "100010")
    assert "nothing was planned or landed" in beyond
    assert "give a window" in refused(code=EXIT_USAGE)
    assert "DAGSTER_HOME" in refused(
        "--from-offset", "0", "--to-offset", "1", code=EXIT_USAGE, DAGSTER_HOME=""
    )

    # Kafka deletes the first batch of partition 0 (as retention would): the times of what it
    # deleted are beyond offsets-for-times, so a window reaching them is refused ...
    gone = range_on(first, 0)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    (future,) = admin.delete_records([TopicPartition(topic, 0, gone.end)]).values()
    future.result(timeout=30)
    early = refused("--partition", "0", "--since", iso(stamps[0] - HOUR), "--until", iso(stamps[1]))
    assert "reaches before Kafka's log of partition 0" in early
    assert f"--from-offset {gone.start}" in early
    # ... and one after the newest deleted record maps as before
    orderflow("backfill", "--partition", "0", "--since", iso(stamps[1] - 0.5 * HOUR), env=env)


@pytest.mark.slow
def test_a_launched_backfill_of_retired_ranges_is_run_by_the_daemon_and_re_lands_nothing(
    dagster_testbed, topic, tmp_path
):
    from tests.dagster_processes import dagster_daemon, wait_until
    from tests.test_backfill_ui import DONE, rows_landed_by_run
    from tests.test_dagster_e2e import run_summary

    # ~220 messages: one range on each of the 4 partitions, each starting at offset 0
    bed = dagster_testbed(
        orders=60, group_prefix="orderflow-launch", extra={"ORDERFLOW_MAX_EVENTS_PER_BATCH": "1000"}
    )
    orderflow("catch-up", "--no-dbt", env=bed.env)
    retire_everything(bed.instance, bed.env)
    before = table_checksums(bed.conn, topic)
    launched = orderflow(
        "backfill", "--from-offset", "0", "--to-offset", "1", "--yes", "--launch", env=bed.env
    )
    backfill_id = launched.stdout.split("submitted backfill ")[1].split()[0]
    keys = set(partitions(bed.instance))
    assert len(keys) == 4, launched.stdout
    with dagster_daemon(bed.env, tmp_path / "logs") as daemon:
        done = wait_until(
            lambda: (b := bed.instance.get_backfill(backfill_id)).status.value in DONE and b,
            timeout_s=600,
            interval_s=2.0,
            what=f"backfill {backfill_id} of {len(keys)} partitions",
            watch=[daemon],
            describe=lambda: run_summary(bed.instance),
        )
    assert done.status.value in {"COMPLETED", "COMPLETED_SUCCESS"}, run_summary(bed.instance)
    runs = bed.instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(keys)
    landed_rows = rows_landed_by_run(bed.instance)
    assert all(landed_rows[r.run_id] == 0 for r in runs), landed_rows
    assert table_checksums(bed.conn, topic) == before
    invariants(bed.conn, bed.consumer, topic, len(bed.outgoing)).assert_exactly_once()
