"""The landing asset: one dynamic partition per Kafka offset range."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Backoff,
    DynamicPartitionsDefinition,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from orderflow_dagster.defs.checks import (
    KAFKA_LAG_CHECK,
    kafka_lag_result,
    max_lag_events,
    topic_lag,
)
from orderflow_dagster.defs.resources import KafkaResource, LandingSettings, PostgresResource
from orderflow_dagster.ingest.errors import OffsetsLostError
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.incarnations import IncarnationError
from orderflow_dagster.land.landing import LandingResult, land_range
from orderflow_dagster.land.ranges import OffsetRange, kafka_topic
from orderflow_dagster.pools import LANDING_POOL

offset_ranges = DynamicPartitionsDefinition(name="kafka_offset_ranges")

# Broker or database unavailable: retry in-process with exponential backoff and jitter. Runs
# killed outright are retried by Dagster's run retries (see dagster.yaml).
TRANSIENT_RETRY = RetryPolicy(
    max_retries=5, delay=2, backoff=Backoff.EXPONENTIAL, jitter=Jitter.FULL
)


DEAD_LETTER_RATE_CHECK = "dead_letter_rate"


def dead_letter_rate_check(result: LandingResult, max_share: float) -> AssetCheckResult:
    """Warn (not fail: poison never blocks the stream) when a range holds too much poison."""
    share = result.dead_letters / result.messages_read if result.messages_read else 0.0
    return AssetCheckResult(
        check_name=DEAD_LETTER_RATE_CHECK,
        passed=share <= max_share,
        severity=AssetCheckSeverity.WARN,
        description=f"{result.dead_letters} of {result.messages_read} records of {result.range} "
        f"were dead-lettered ({share:.2%}; threshold {max_share:.2%})",
        metadata={
            "dead_letters": result.dead_letters,
            "share": round(share, 6),
            "threshold": max_share,
        },
    )


def landing_metadata(result: LandingResult, topic_lag: int | None = None) -> dict[str, object]:
    """What each materialization records; the numbers are plotted over time in the asset's view
    (landing rate, lag)."""
    rng = result.range
    return {
        "range": MetadataValue.text(str(rng)),
        "kafka_partition": rng.partition,
        "start_offset": rng.start,
        "end_offset": rng.end,
        "messages_read": result.messages_read,
        "rows_landed": result.rows_landed,
        "dead_letters": result.dead_letters,
        "already_landed": result.already_landed,
        "duration_s": round(result.duration_s, 3),
        "events_per_s": round(result.events_per_second, 1),
        "committed_offset": -1 if result.committed_offset is None else result.committed_offset,
        "lag_left": -1 if result.lag_after is None else result.lag_after,
        "topic_lag": -1 if topic_lag is None else topic_lag,
    }


@asset(
    partitions_def=offset_ranges,
    group_name="ingest",
    retry_policy=TRANSIENT_RETRY,
    # bounds the landings running at once (orderflow_dagster/pools.py)
    pool=LANDING_POOL,
    kinds={"kafka", "postgres"},
    check_specs=[
        AssetCheckSpec(
            DEAD_LETTER_RATE_CHECK,
            asset="raw_order_events",
            description="share of the range's records dead-lettered, against "
            "ORDERFLOW_MAX_DEAD_LETTER_SHARE",
        ),
        AssetCheckSpec(
            KAFKA_LAG_CHECK,
            asset="raw_order_events",
            description="offsets of the topic not landed yet after this landing, against "
            "ORDERFLOW_MAX_LAG_EVENTS",
        ),
    ],
    description="Kafka records of one offset range, landed exactly once into raw.order_events "
    "(poison into raw.dead_letters) in one transaction with its raw.ingest_ledger row.",
)
def raw_order_events(
    context: AssetExecutionContext,
    kafka: KafkaResource,
    postgres: PostgresResource,
    landing: LandingSettings,
) -> MaterializeResult:
    rng = OffsetRange.from_key(context.partition_key)
    with postgres.connect() as conn, kafka.consumer() as consumer:
        try:
            result = land_range(
                rng,
                conn=conn,
                consumer=consumer,
                run_id=context.run_id,
                max_message_bytes=landing.max_message_bytes,
            )
        except OffsetsLostError as exc:
            # Retention deleted offsets before they were landed: retrying cannot bring them back.
            raise Failure(
                description=f"offsets of {rng} are no longer in Kafka: {exc}. Those records are "
                "lost upstream; record the loss with `orderflow ack-loss` (a dry run shows what "
                "it records) and the rest of the range lands: see docs/operations.md.",
                allow_retries=False,
            ) from exc
        except IncarnationError as exc:
            # a range of a re-created topic's old incarnation, or a log that ends below the
            # ledger: retrying cannot change either
            raise Failure(description=str(exc), allow_retries=False) from exc
        # the whole topic's lag, as the consumer group's commits (only what landed) show it:
        # two metadata round trips, against a run that costs seconds to start
        topic = kafka_topic(rng.topic)
        parts = kafka_source.partitions(consumer, topic)
        marks = kafka_source.watermarks(consumer, topic, parts)
        committed = kafka_source.committed(consumer, topic, parts)
    context.log.info(
        f"landed {rng}: {result.rows_landed} rows, {result.dead_letters} dead letters, "
        f"{result.already_landed} already landed, {result.events_per_second:.0f} events/s"
    )
    return MaterializeResult(
        metadata=landing_metadata(result, topic_lag(marks, committed)),
        check_results=[
            dead_letter_rate_check(result, landing.max_dead_letter_share),
            kafka_lag_result(topic, marks, committed, max_lag_events()),
        ],
    )
