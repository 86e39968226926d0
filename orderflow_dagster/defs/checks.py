"""Asset checks an operator watches: how far landing is behind Kafka, and how far order_status is
behind what landed. Each is a pure function of figures read with bounded queries, so both can
fail, and their thresholds come from the environment.

- `kafka_lag` (on raw_order_events, reported by every landing): offsets in Kafka that the
  consumer group has not committed yet, summed over the topic's partitions. The group commits
  only what landed, so this is the landing lag.
- `order_status_staleness` (on order_status, run by every dbt build after the model): the age of
  the oldest ledger range that the last completed build of order_status could not see. Zero when
  the mart holds everything that landed, however long ago the last event arrived, so an idle
  stream is fresh and a stalled dbt is not.
"""

# No `from __future__ import annotations`: Dagster inspects the check function's annotations.

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import psycopg
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    asset_check,
)
from psycopg import sql

from orderflow_dagster import settings
from orderflow_dagster.defs.resources import PostgresResource

KAFKA_LAG_CHECK = "kafka_lag"
DEFAULT_MAX_LAG_EVENTS = 100_000
DEFAULT_MAX_STALENESS_SECONDS = 120
ORDER_STATUS = AssetKey(["order_status"])


def max_lag_events() -> int:
    return settings.env_int("ORDERFLOW_MAX_LAG_EVENTS", DEFAULT_MAX_LAG_EVENTS)


def max_staleness_seconds() -> int:
    return settings.env_int("ORDERFLOW_MAX_STALENESS_SECONDS", DEFAULT_MAX_STALENESS_SECONDS)


def partition_lags(
    marks: Mapping[int, tuple[int, int]], committed: Mapping[int, int | None]
) -> dict[int, int]:
    """Offsets not committed yet, per partition: the high watermark less the committed offset
    (the low watermark when nothing is committed, or when retention deleted past the commit)."""
    out = {}
    for p, (low, high) in sorted(marks.items()):
        done = committed.get(p)
        out[p] = max(0, high - max(low, low if done is None else done))
    return out


def topic_lag(marks: Mapping[int, tuple[int, int]], committed: Mapping[int, int | None]) -> int:
    return sum(partition_lags(marks, committed).values())


def kafka_lag_result(
    topic: str,
    marks: Mapping[int, tuple[int, int]],
    committed: Mapping[int, int | None],
    max_lag: int,
) -> AssetCheckResult:
    per_partition = partition_lags(marks, committed)
    lag = sum(per_partition.values())
    return AssetCheckResult(
        check_name=KAFKA_LAG_CHECK,
        passed=lag <= max_lag,
        severity=AssetCheckSeverity.WARN,
        description=f"{lag} offset(s) of {topic} not landed yet (threshold {max_lag}, "
        "ORDERFLOW_MAX_LAG_EVENTS)",
        metadata={
            "lag": lag,
            "threshold": max_lag,
            "lag_by_partition": {str(p): n for p, n in per_partition.items()},
        },
    )


@dataclass(frozen=True)
class Staleness:
    built: bool  # whether order_status has a completed build to compare with
    unmodelled_ranges: int
    oldest_unmodelled_at: datetime | None
    now: datetime

    @property
    def seconds(self) -> float:
        if self.oldest_unmodelled_at is None:
            return 0.0
        return max(0.0, (self.now - self.oldest_unmodelled_at).total_seconds())


def read_staleness(conn: psycopg.Connection, schema: str, model: str = "order_status") -> Staleness:
    """What the last completed build of `model` could not see of the ledger.

    The incremental marts record the snapshot they read in (`<schema>.incremental_runs`); a ledger
    row not visible in it landed after. Bounded: only rows from the snapshot's xmin on are read,
    through the ledger's xact_id index.
    """
    now = conn.execute("select now()").fetchone()[0]
    exists = conn.execute(
        "select to_regclass(%s) is not null", (f"{schema}.incremental_runs",)
    ).fetchone()[0]
    snapshot = None
    if exists:
        row = conn.execute(
            sql.SQL(
                "select read_snapshot::text from {} where model = %s order by id desc limit 1"
            ).format(sql.Identifier(schema, "incremental_runs")),
            (model,),
        ).fetchone()
        snapshot = row[0] if row else None
    if snapshot is None:
        row = conn.execute("select count(*), min(landed_at) from raw.ingest_ledger").fetchone()
        return Staleness(False, int(row[0]), row[1], now)
    count, oldest = conn.execute(
        "select count(*), min(landed_at) from raw.ingest_ledger"
        " where xact_id >= pg_snapshot_xmin(%s::pg_snapshot)"
        " and not pg_visible_in_snapshot(xact_id, %s::pg_snapshot)",
        (snapshot, snapshot),
    ).fetchone()
    return Staleness(True, int(count), oldest, now)


def staleness_result(staleness: Staleness, max_seconds: float) -> AssetCheckResult:
    seconds = round(staleness.seconds, 1)
    if not staleness.built:
        passed = staleness.unmodelled_ranges == 0
        text = (
            f"order_status has no completed build; {staleness.unmodelled_ranges} landed range(s) "
            "wait for one"
        )
    else:
        passed = seconds <= max_seconds
        text = (
            f"{staleness.unmodelled_ranges} landed range(s) not in order_status yet, the oldest "
            f"landed {seconds} s ago (threshold {max_seconds} s, ORDERFLOW_MAX_STALENESS_SECONDS)"
            if staleness.unmodelled_ranges
            else "order_status holds every range landed"
        )
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        description=text,
        metadata={
            "staleness_s": seconds,
            "unmodelled_ranges": staleness.unmodelled_ranges,
            "threshold_s": max_seconds,
        },
    )


@asset_check(
    asset=ORDER_STATUS,
    name="order_status_staleness",
    description="Age of the oldest landed range the last build of order_status could not see "
    "(0 when it holds everything that landed); warns above ORDERFLOW_MAX_STALENESS_SECONDS.",
)
def order_status_staleness(
    context: AssetCheckExecutionContext, postgres: PostgresResource
) -> AssetCheckResult:
    schema = os.environ.get("ORDERFLOW_ANALYTICS_SCHEMA") or "analytics"
    with postgres.connect() as conn:
        staleness = read_staleness(conn, schema)
    return staleness_result(staleness, max_staleness_seconds())
