"""The planning sensor: Kafka offsets -> dynamic partitions -> runs."""

import time

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from orderflow_dagster import settings
from orderflow_dagster.defs.assets import offset_ranges, raw_order_events
from orderflow_dagster.defs.launch import (
    IN_PROGRESS,
    RunInfo,
    dbt_build_decision,
    heartbeat_due,
    launches,
    raw_marker,
)
from orderflow_dagster.defs.resources import KafkaResource, LandingSettings, PostgresResource
from orderflow_dagster.land.landing import repair_kafka_commits
from orderflow_dagster.land.planner import lost_message, plan_ranges
from orderflow_dagster.land.store import raw_marker_counts

PARTITION_TAG = "dagster/partition"


def runs_by_partition(instance: DagsterInstance, keys: list[str]) -> dict[str, list[RunInfo]]:
    if not keys:
        return {}
    out: dict[str, list[RunInfo]] = {}
    for record in instance.get_run_records(filters=RunsFilter(tags={PARTITION_TAG: keys})):
        run = record.dagster_run
        out.setdefault(run.tags.get(PARTITION_TAG, ""), []).append(
            RunInfo(run.status.value, record.end_time)
        )
    return out


def missing_partitions(instance: DagsterInstance, name: str, keys: list[str]) -> list[str]:
    """The `keys` not yet partitions of the dynamic partitions definition `name`: one indexed
    lookup per key asked about (the unlanded ranges, a few per Kafka partition), never the
    definition's whole key set, which grows by a key per range landed."""
    return [k for k in keys if not instance.has_dynamic_partition(name, k)]


@sensor(
    asset_selection=[raw_order_events],
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Plans Kafka offset ranges from the ledger and adds each as a partition of "
    "raw_order_events; repairs the consumer group's committed offsets from the ledger. Lands a "
    "deleted and re-created topic as a stream of its own; stops (a failed tick saying what to "
    "do) when Kafka's log ends below the ledger.",
)
def kafka_offset_ranges_sensor(
    context: SensorEvaluationContext,
    kafka: KafkaResource,
    postgres: PostgresResource,
    landing: LandingSettings,
) -> SensorResult | SkipReason:
    with postgres.connect() as conn, kafka.consumer() as consumer:
        # an IncarnationError (the log ends below the ledger) fails the tick with its message:
        # nothing is planned around it, nothing committed
        plan = plan_ranges(
            conn,
            consumer,
            kafka.topic,
            max_events_per_batch=landing.max_events_per_batch,
            max_inflight=landing.max_inflight,
            min_events_per_batch=landing.min_events_per_batch,
        )
        # a process that died between the Postgres and the Kafka commit left Kafka behind
        repair_kafka_commits(conn, consumer, kafka.topic, topic_id=plan.topic_id)
    if plan.registered:
        context.log.warning(f"{kafka.topic} is landed as stream {plan.topic}: {plan.registered}")
    if plan.lost:
        context.log.warning(lost_message(plan.lost))

    keys = [r.key for r in plan.unlanded]
    to_add = missing_partitions(context.instance, offset_ranges.name, keys)
    todo = launches(
        keys,
        runs_by_partition(context.instance, keys),
        now=time.time(),
        retry_grace_seconds=landing.retry_grace_seconds,
    )
    if not todo and not to_add:
        return SkipReason(plan.skip_reason(landing.max_inflight))
    context.log.info(
        f"{len(plan.new)} new range(s), {len(todo)} run(s) to launch, lag={plan.lag} on "
        f"{plan.topic}"
    )
    return SensorResult(
        run_requests=[RunRequest(run_key=t.run_key, partition_key=t.partition_key) for t in todo],
        dynamic_partitions_requests=[offset_ranges.build_add_request(to_add)] if to_add else [],
    )


dbt_job = define_asset_job(
    "orderflow_dbt_job",
    selection=AssetSelection.groups("staging", "marts", "publish"),
    description="dbt build of the staging and mart models, with their tests as asset checks, "
    "then the publish of order status changes to orders.status.",
)


@sensor(
    job=dbt_job,
    # the daemon evaluates sensors at most every 5 s: anything shorter changes nothing
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs the dbt models after new offset ranges land or dead letters are replayed: "
    "one build for every burst, never two at once; and a no-op build every "
    "ORDERFLOW_DBT_HEARTBEAT_SECONDS while nothing lands, so order_status's freshness policy "
    "tells an idle stream from a stalled one.",
)
def dbt_after_landing_sensor(
    context: SensorEvaluationContext, postgres: PostgresResource
) -> RunRequest | SkipReason:
    with postgres.connect() as conn:
        counts = raw_marker_counts(conn)  # counters and an index: no count(*) over the history
    ranges, last_landed = counts.ledger_rows, counts.last_landed_at
    replays, last_replayed = counts.replays, counts.last_replayed_at
    marker = raw_marker(ranges, last_landed, replays, last_replayed)
    running = context.instance.get_run_records(
        filters=RunsFilter(
            job_name=dbt_job.name, statuses=[DagsterRunStatus(s) for s in IN_PROGRESS]
        ),
        limit=1,
    )
    reason = dbt_build_decision(
        ranges + replays, marker, context.cursor, dbt_in_progress=bool(running)
    )
    if reason is None:
        context.update_cursor(marker)
        return RunRequest(run_key=f"dbt|{marker}")
    if not running and marker == (context.cursor or "") and ranges + replays:
        last = context.instance.get_run_records(filters=RunsFilter(job_name=dbt_job.name), limit=1)
        started = None
        if last:
            started = last[0].start_time or last[0].create_timestamp.timestamp()
        now = time.time()
        if heartbeat_due(started, now, settings.env_int("ORDERFLOW_DBT_HEARTBEAT_SECONDS", 300)):
            return RunRequest(
                run_key=f"dbt|heartbeat|{int(now)}", tags={"orderflow/trigger": "heartbeat"}
            )
    return SkipReason(f"{reason} ({ranges} ranges in the ledger, {replays} replays)")
