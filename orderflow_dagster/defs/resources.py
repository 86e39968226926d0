"""Typed resources, wired once from the environment in `resources_from_env`."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from confluent_kafka import Consumer
from dagster import ConfigurableResource, EnvVar

from orderflow_dagster import settings
from orderflow_dagster.land import kafka_source, session, store
from orderflow_dagster.land.landing import DEFAULT_MAX_MESSAGE_BYTES

_schema_ready: set[str] = set()

# A run costs seconds to start and the landing streams in chunks, so a range that is behind
# takes up to a few seconds of landing (~100k events/s), and one planned beside a range in flight
# waits for enough offsets to be worth its run. See docs/benchmarks.md.
DEFAULT_MAX_EVENTS_PER_BATCH = 500_000
DEFAULT_MIN_EVENTS_PER_BATCH = 2_000


class KafkaResource(ConfigurableResource):
    """The source cluster. SASL/SSL settings pass through from ORDERFLOW_KAFKA_CONFIG_* at run
    time, so secrets never enter Dagster config or the UI."""

    bootstrap_servers: str
    topic: str = settings.DEFAULT_TOPIC
    consumer_group: str = settings.DEFAULT_CONSUMER_GROUP

    @contextmanager
    def consumer(self) -> Iterator[Consumer]:
        consumer = kafka_source.open_consumer(self.bootstrap_servers, self.consumer_group)
        try:
            yield consumer
        finally:
            consumer.close()


class PostgresResource(ConfigurableResource):
    """The warehouse. The DSN comes from ORDERFLOW_POSTGRES_DSN and is never logged. Sessions
    pin their isolation level and timeouts (see land/session.py)."""

    dsn: str

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        conn = session.connect(self.dsn)
        try:
            if self.dsn not in _schema_ready:
                store.ensure_schema(conn)
                _schema_ready.add(self.dsn)
            yield conn
        finally:
            conn.close()


class LandingSettings(ConfigurableResource):
    """How ranges are cut and landed (see ranges.plan_partition: sized by lag)."""

    max_events_per_batch: int = DEFAULT_MAX_EVENTS_PER_BATCH
    # while a range of a partition is in flight, the next waits until this many offsets do
    min_events_per_batch: int = DEFAULT_MIN_EVENTS_PER_BATCH
    # one range per partition in flight: landings of a partition take its lock one at a time
    # anyway, and a range planned while another waits would be cut before the lag it could carry
    max_inflight: int = 1
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # a failed range is re-requested only after this long, so Dagster's own run retries go first
    retry_grace_seconds: int = 30
    # the dead_letter_rate asset check warns above this share of a range
    max_dead_letter_share: float = 0.05


class RetentionSettings(ConfigurableResource):
    """How long landed ranges stay partitions of raw_order_events (see defs/retention.py). The
    ledger keeps every range whatever happens to its partition."""

    # a landed range is retired this long after its last landing, run or re-add for backfill
    retention_hours: float = 24.0
    # at most this many partitions: beyond it the oldest landed ones go sooner (0: no bound)
    max_partitions: int = 20_000
    # partitions retired by one tick, and partition keys one tick reads per look
    max_per_tick: int = 1_000
    # delete the runs of a retired partition with it (their event logs go with them)
    retire_runs: bool = True

    @property
    def retention_seconds(self) -> float:
        return self.retention_hours * 3600.0


def retention_from_env() -> RetentionSettings:
    defaults = RetentionSettings()
    return RetentionSettings(
        retention_hours=settings.env_float(
            "ORDERFLOW_PARTITION_RETENTION_HOURS", defaults.retention_hours
        ),
        max_partitions=settings.env_int("ORDERFLOW_MAX_PARTITIONS", defaults.max_partitions),
        max_per_tick=settings.env_int("ORDERFLOW_PARTITION_RETIRE_PER_TICK", defaults.max_per_tick),
        retire_runs=settings.env_flag("ORDERFLOW_PARTITION_RETIRE_RUNS", defaults.retire_runs),
    )


def resources_from_env(*, resolved: bool = False) -> dict[str, object]:
    """The resources, with the secrets as `EnvVar`s that Dagster resolves at run time, or, for
    code that uses them outside a Dagster run (`resolved=True`), read from the environment now."""

    def secret(name: str) -> str:
        return settings.require(name) if resolved else EnvVar(name)

    return {
        "kafka": KafkaResource(
            bootstrap_servers=secret("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"),
            topic=settings.topic(),
            consumer_group=settings.consumer_group(),
        ),
        "postgres": PostgresResource(dsn=secret("ORDERFLOW_POSTGRES_DSN")),
        "landing": LandingSettings(
            max_events_per_batch=settings.env_int(
                "ORDERFLOW_MAX_EVENTS_PER_BATCH", DEFAULT_MAX_EVENTS_PER_BATCH
            ),
            min_events_per_batch=settings.env_int(
                "ORDERFLOW_MIN_EVENTS_PER_BATCH", DEFAULT_MIN_EVENTS_PER_BATCH
            ),
            max_inflight=settings.env_int("ORDERFLOW_MAX_INFLIGHT", 1),
            max_message_bytes=settings.env_int(
                "ORDERFLOW_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
            retry_grace_seconds=settings.env_int("ORDERFLOW_RETRY_GRACE_SECONDS", 30),
            max_dead_letter_share=float(os.environ.get("ORDERFLOW_MAX_DEAD_LETTER_SHARE") or 0.05),
        ),
        "retention": retention_from_env(),
    }
