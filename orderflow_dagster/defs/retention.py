"""The retention sensor: retires the partitions of landed ranges, so the partitions of
raw_order_events (one per planned range, tens of thousands a day under load) stay few enough
for the Dagster UI.

A partition is retired (deleted from Dagster, with its runs unless told otherwise) only when
the ledger covers its whole range, no run of it is in progress, and it is older than the
retention, or beyond the count bound (then the oldest go first). The ledger stays the truth:
`orderflow backfill` adds any retired range again, and retention then keeps it for a whole
retention. The decisions are lifecycle.plan_retirement's; this module gathers the facts and acts.

Each tick reads a bounded number of partition keys, never all of them: the oldest page (where
ranges come due, as partitions are added in planning order), one page further on from a cursor
that sweeps the rest in turn (so partitions kept at the head, such as a range that cannot land,
never stop retirement behind them), and, when a count bound is set, the newest `max_partitions`
keys (Dagster has no count of a definition's partitions; a page one longer than the bound tells
whether it is exceeded, and which keys lie beyond it).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from orderflow_dagster.defs.assets import offset_ranges
from orderflow_dagster.defs.launch import IN_PROGRESS
from orderflow_dagster.defs.resources import PostgresResource, RetentionSettings
from orderflow_dagster.land import lifecycle, lifecycle_store

PARTITION_TAG = "dagster/partition"
# kept: a run started or finished, or a re-add was recorded, between the look and the deletion
KEPT_CHANGED = "changed while this tick looked"


@dataclass
class PartitionRuns:
    finished: list[str] = field(default_factory=list)  # run ids
    in_progress: bool = False
    last_activity: float | None = None  # unix seconds: the latest end (or start) of its runs


def partition_runs(instance: DagsterInstance, keys: Sequence[str]) -> dict[str, PartitionRuns]:
    """The runs of each of `keys` (one query, bounded by the keys asked about)."""
    out = {key: PartitionRuns() for key in keys}
    if not keys:
        return out
    for record in instance.get_run_records(filters=RunsFilter(tags={PARTITION_TAG: list(keys)})):
        run = record.dagster_run
        runs = out.get(run.tags.get(PARTITION_TAG, ""))
        if runs is None:
            continue
        if run.status.value in IN_PROGRESS:
            runs.in_progress = True
        else:
            runs.finished.append(run.run_id)
        seen = record.end_time or record.start_time or record.create_timestamp.timestamp()
        runs.last_activity = max(seen, runs.last_activity or seen)
    return out


@dataclass(frozen=True)
class Look:
    keys: list[str]  # oldest first
    cursor: str | None  # where the next sweep page starts (None: from the head again)
    beyond_bound: set[str]


def look(instance: DagsterInstance, policy: lifecycle.RetentionPolicy, cursor: str | None) -> Look:
    """The partition keys one tick considers: see the module's docstring."""
    name, page = offset_ranges.name, policy.max_per_tick
    head = instance.get_paginated_dynamic_partitions(name, limit=page, ascending=True)
    keys = list(head.results)
    next_cursor = None
    if head.has_more:
        sweep = instance.get_paginated_dynamic_partitions(
            name, limit=page, ascending=True, cursor=cursor or head.cursor
        )
        seen = set(keys)
        keys += [k for k in sweep.results if k not in seen]
        next_cursor = sweep.cursor if sweep.has_more else None
    beyond: set[str] = set()
    if policy.max_partitions:
        newest = instance.get_paginated_dynamic_partitions(
            name, limit=policy.max_partitions, ascending=False
        )
        if newest.has_more:
            within = set(newest.results)
            beyond = {k for k in keys if k not in within}
    return Look(keys, next_cursor, beyond)


def policy_of(retention: RetentionSettings) -> lifecycle.RetentionPolicy:
    return lifecycle.RetentionPolicy(
        retention.retention_seconds, retention.max_partitions, retention.max_per_tick
    )


def evaluate(
    instance: DagsterInstance,
    postgres: PostgresResource,
    retention: RetentionSettings,
    cursor: str | None,
    *,
    now: float | None = None,
) -> tuple[lifecycle.Retirement, Look]:
    """Decide what to retire and retire it; what was decided and looked at. `now` (unix
    seconds) is the clock the retention is measured by."""
    policy = policy_of(retention)
    seen = look(instance, policy, cursor)
    # a key that names no range is never retired (facts_for marks it foreign)
    ranges = [r for r in map(lifecycle.range_of, seen.keys) if r is not None]
    with postgres.connect() as conn:
        near = lifecycle_store.ledger_near(conn, ranges)
        readded = lifecycle_store.readds(conn, seen.keys)
    runs = partition_runs(instance, seen.keys)
    facts = [
        lifecycle.facts_for(
            key,
            near.get(key, ()),
            run_activity=runs[key].last_activity,
            in_progress=runs[key].in_progress,
            readded_at=readded.get(key),
        )
        for key in seen.keys
    ]
    now = time.time() if now is None else now
    decision = lifecycle.plan_retirement(
        facts, now=now, policy=policy, beyond_bound=seen.beyond_bound
    )
    done = retire(instance, postgres, retention, decision.retire, runs, now=now)
    if len(done) < len(decision.retire):
        kept = decision.kept + Counter({KEPT_CHANGED: len(decision.retire) - len(done)})
        decision = replace(decision, retire=done, kept=kept)
    return decision, seen


def retire(
    instance: DagsterInstance,
    postgres: PostgresResource,
    retention: RetentionSettings,
    keys: Sequence[str],
    runs: dict[str, PartitionRuns],
    *,
    now: float,
) -> list[str]:
    """Delete the partitions of `keys` (their finished runs first, so a tick that dies midway
    leaves a partition to retire again, never runs of a partition it no longer sees); the keys
    retired."""
    if not keys:
        return []
    # a run launched, or a re-add for a backfill recorded, since the facts were read keeps it
    again = partition_runs(instance, keys)
    with postgres.connect() as conn:
        held = lifecycle_store.readds(conn, keys)
    cutoff = now - retention.retention_seconds
    done = []
    for key in keys:
        if again[key].in_progress or len(again[key].finished) != len(runs[key].finished):
            continue
        if key in held and held[key] > cutoff:
            continue
        if retention.retire_runs:
            for run_id in again[key].finished:
                instance.delete_run(run_id)
        instance.delete_dynamic_partition(offset_ranges.name, key)
        done.append(key)
    return done


@sensor(
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Retires the partitions of raw_order_events whose ranges the ledger holds, once "
    "older than ORDERFLOW_PARTITION_RETENTION_HOURS or beyond ORDERFLOW_MAX_PARTITIONS, with "
    "their runs; never a range not landed or being run. `orderflow backfill` adds any back.",
)
def partition_retention_sensor(
    context: SensorEvaluationContext, postgres: PostgresResource, retention: RetentionSettings
) -> SkipReason:
    decision, seen = evaluate(context.instance, postgres, retention, context.cursor)
    context.update_cursor(seen.cursor)
    message = lifecycle.describe(decision, len(seen.keys), policy_of(retention))
    if decision.retire:
        context.log.info(message)
    # retiring requests no run, so every tick is a skip that says what it did and kept
    return SkipReason(message)
