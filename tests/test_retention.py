"""Retention of offset-range partitions, against a real Dagster instance (SQLite storage, as the
demo's), Kafka and Postgres: the planning and retention sensors evaluated tick by tick while
ranges land through the asset, in-process."""

from __future__ import annotations

from pathlib import Path

from dagster import (
    DagsterInstance,
    RunsFilter,
    SensorResult,
    SkipReason,
    build_sensor_context,
    materialize,
)

from orderflow_dagster.defs.assets import offset_ranges, raw_order_events
from orderflow_dagster.defs.resources import (
    KafkaResource,
    LandingSettings,
    PostgresResource,
    RetentionSettings,
)
from orderflow_dagster.defs.retention import PARTITION_TAG, partition_retention_sensor
from orderflow_dagster.defs.sensors import kafka_offset_ranges_sensor
from orderflow_dagster.land import lifecycle
from tests.dagster_processes import make_dagster_home
from tests.support import invariants, orderflow, produce_orders
from tests.test_landing import connections

MAX_PARTITIONS = 5


def dagster_instance(path: Path) -> DagsterInstance:
    """An instance configured like a deployment's, in `path` (what DAGSTER_HOME names)."""
    return DagsterInstance.from_config(str(make_dagster_home(path)))


def pipeline_resources(
    env: dict[str, str], retention: RetentionSettings, max_inflight: int = 1
) -> dict:
    return {
        "kafka": KafkaResource(
            bootstrap_servers=env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
            topic=env["ORDERFLOW_TOPIC"],
            consumer_group=env["ORDERFLOW_CONSUMER_GROUP"],
        ),
        "postgres": PostgresResource(dsn=env["ORDERFLOW_POSTGRES_DSN"]),
        "landing": LandingSettings(
            max_events_per_batch=int(env["ORDERFLOW_MAX_EVENTS_PER_BATCH"]),
            max_inflight=max_inflight,
            # every tick plans what waits, however little: ranges land between ticks here
            min_events_per_batch=1,
        ),
        "retention": retention,
    }


def plan_tick(instance: DagsterInstance, resources: dict) -> list[str]:
    """One tick of the planning sensor, its partitions added as the daemon adds them; the keys
    it asked runs for."""
    result = kafka_offset_ranges_sensor(
        build_sensor_context(instance=instance, resources=resources)
    )
    if isinstance(result, SkipReason):
        return []
    assert isinstance(result, SensorResult)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    return [r.partition_key for r in result.run_requests]


def retention_tick(instance: DagsterInstance, resources: dict, cursor: str | None):
    """One tick of the retention sensor: (its skip reason, its cursor afterwards)."""
    context = build_sensor_context(instance=instance, resources=resources, cursor=cursor)
    result = partition_retention_sensor(context)
    assert isinstance(result, SkipReason), result
    return result.skip_message, context.cursor


def land(instance: DagsterInstance, resources: dict, keys: list[str]) -> list[dict]:
    """Materialize each partition of `keys` as a run of `instance`; each run's landing metadata."""
    out = []
    for key in keys:
        result = materialize(
            [raw_order_events], partition_key=key, instance=instance, resources=resources
        )
        assert result.success
        (event,) = result.get_asset_materialization_events()
        metadata = event.materialization.metadata
        out.append({name: value.value for name, value in metadata.items()})
    return out


def partitions(instance: DagsterInstance) -> set[str]:
    return set(instance.get_dynamic_partitions(offset_ranges.name))


def run_keys(instance: DagsterInstance, keys: set[str]) -> set[str]:
    if not keys:
        return set()
    records = instance.get_run_records(filters=RunsFilter(tags={PARTITION_TAG: sorted(keys)}))
    return {r.dagster_run.tags[PARTITION_TAG] for r in records}


def test_retention_keeps_the_partition_count_under_its_bound_while_ranges_land_with_every_invariant_intact(  # noqa: E501
    cli_env, topic, kafka_bootstrap, tmp_path
):
    env = cli_env(group=f"retention-{topic}", max_events_per_batch=1000)
    instance = dagster_instance(tmp_path / "dagster")
    # no range ever gets old enough: only the count bound retires
    retention = RetentionSettings(
        retention_hours=24, max_partitions=MAX_PARTITIONS, max_per_tick=4, retire_runs=True
    )
    resources = pipeline_resources(env, retention)
    produced, planned, cursor = 0, set(), None
    for step in range(6):
        produced += len(produce_orders(kafka_bootstrap, topic, 25, seed=step + 1, poison_rate=0.05))
        todo = plan_tick(instance, resources)
        assert todo, f"step {step}: the planning sensor planned nothing"
        planned |= set(todo)
        # with ranges in flight, retention may retire landed ones only
        message, cursor = retention_tick(instance, resources, cursor)
        assert set(todo) <= partitions(instance), message
        land(instance, resources, todo)
        message, cursor = retention_tick(instance, resources, cursor)
        present = partitions(instance)
        assert len(present) <= MAX_PARTITIONS, (step, message, sorted(present))
        assert present <= planned
        if len(planned) > MAX_PARTITIONS:
            assert f"max {MAX_PARTITIONS}" in message and "looked at" in message, message

    retired = planned - partitions(instance)
    assert len(retired) == len(planned) - MAX_PARTITIONS > 0
    # the runs of retired partitions went with them; the others keep theirs
    assert run_keys(instance, retired) == set()
    assert run_keys(instance, partitions(instance)) == partitions(instance)
    # the ledger stays the truth: every planned range landed once, whatever Dagster holds
    with connections(
        kafka_bootstrap, env["ORDERFLOW_POSTGRES_DSN"], env["ORDERFLOW_CONSUMER_GROUP"]
    ) as (
        conn,
        consumer,
    ):
        invariants(conn, consumer, topic, produced).assert_exactly_once()
        ledger_keys = {
            k
            for (k,) in conn.execute(
                "select partition_key from raw.ingest_ledger where topic = %s", (topic,)
            )
        }
    assert ledger_keys == planned
    verified = orderflow("verify", env=env)
    assert "FAIL" not in verified.stdout
    # and a further tick has nothing left to do, and says why
    message, _ = retention_tick(instance, resources, cursor)
    assert message.startswith(f"nothing to retire among {MAX_PARTITIONS} partition(s)"), message
    assert f"{MAX_PARTITIONS} {lifecycle.KEPT_YOUNG}" in message
    instance.dispose()


def test_retention_never_retires_a_range_that_has_not_landed(
    cli_env, topic, kafka_bootstrap, tmp_path
):
    env = cli_env(group=f"retention-unlanded-{topic}", max_events_per_batch=1000)
    instance = dagster_instance(tmp_path / "dagster")
    # every landed range is due at once, and the bound is below what is in flight
    retention = RetentionSettings(retention_hours=0, max_partitions=1, max_per_tick=100)
    resources = pipeline_resources(env, retention, max_inflight=2)
    produce_orders(kafka_bootstrap, topic, 20, seed=1)
    first = plan_tick(instance, resources)
    produce_orders(kafka_bootstrap, topic, 20, seed=2)
    # the tick asks runs for every range without one: the first ones again, and the new ones
    second = [k for k in plan_tick(instance, resources) if k not in first]
    assert first and second
    land(instance, resources, first)
    message, _ = retention_tick(instance, resources, None)
    assert partitions(instance) == set(second), message
    assert message.startswith(f"retired {len(first)} of {len(first) + len(second)}"), message
    assert f"{len(second)} {lifecycle.KEPT_UNLANDED}" in message
    instance.dispose()


def test_partitions_kept_at_the_head_never_stop_retirement_behind_them(
    cli_env, topic, kafka_bootstrap, tmp_path
):
    env = cli_env(group=f"retention-sweep-{topic}", max_events_per_batch=1000)
    instance = dagster_instance(tmp_path / "dagster")
    # the oldest partitions name no range: never retired, they fill every head page
    foreign = [f"hand-made-{i}" for i in range(3)]
    instance.add_dynamic_partitions(offset_ranges.name, foreign)
    retention = RetentionSettings(retention_hours=0, max_partitions=0, max_per_tick=2)
    resources = pipeline_resources(env, retention, max_inflight=1)
    produce_orders(kafka_bootstrap, topic, 20, seed=1)
    ranges = plan_tick(instance, resources)
    land(instance, resources, ranges)
    assert len(ranges) == 4
    cursor, messages = None, []
    # each tick reads the head page and one page further on, two keys each
    for _ in range(4):
        message, cursor = retention_tick(instance, resources, cursor)
        messages.append(message)
    assert partitions(instance) == set(foreign), messages
    assert any(f"{lifecycle.KEPT_FOREIGN}" in m for m in messages)
    instance.dispose()
