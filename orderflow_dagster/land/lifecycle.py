"""The lifecycle of offset-range partitions: which to retire, and which a backfill window selects.
Pure functions only; the retention sensor (defs/retention.py) and `orderflow backfill`
(serve/backfill.py) gather the facts and act on the answers.

Retiring a partition removes it from Dagster only. The ledger (raw.ingest_ledger) stays the
truth about what landed, and a retired range can be added again, for a backfill, at any time.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from orderflow_dagster.land.ranges import Coverage, OffsetRange

# why a partition was kept, as the retention sensor reports it
KEPT_FOREIGN = "not an offset-range key"
KEPT_UNLANDED = "not landed (planned or in flight)"
KEPT_RUNNING = "a run of it in progress"
KEPT_READDED = "re-added for a backfill"
KEPT_YOUNG = "younger than the retention"
KEPT_DEFERRED = "over the per-tick bound (next tick)"


@dataclass(frozen=True)
class RetentionPolicy:
    retention_seconds: float
    max_partitions: int  # 0: no bound on the count
    max_per_tick: int

    def __post_init__(self) -> None:
        if self.retention_seconds < 0:
            raise ValueError("the partition retention cannot be negative")
        if self.max_partitions < 0:
            raise ValueError("the maximum number of partitions cannot be negative (0: no bound)")
        if self.max_per_tick < 1:
            raise ValueError("at least one partition must be retired per tick")


@dataclass(frozen=True)
class PartitionFacts:
    """What retention knows about one partition of raw_order_events."""

    key: str
    range: OffsetRange | None  # None: a key that names no offset range (never retired)
    landed: bool  # every offset of the range is covered by the ledger
    # unix seconds: the latest of its ledger rows' landed_at and its runs' ends
    last_activity: float | None
    in_progress: bool = False  # a run of it has not finished
    readded_at: float | None = None  # when `orderflow backfill` last added it again


@dataclass(frozen=True)
class Retirement:
    retire: list[str]  # keys to retire now, oldest first
    kept: Counter = field(default_factory=Counter)  # reason -> partitions kept for it
    # of those looked at, how many lie beyond the count bound (retired sooner than their age)
    over_bound: int = 0


def range_of(key: str) -> OffsetRange | None:
    """The offset range a partition key names; None for a key that names none."""
    try:
        return OffsetRange.from_key(key)
    except ValueError:
        return None


def facts_for(
    key: str,
    spans: Iterable[tuple[int, int, float]],
    *,
    run_activity: float | None = None,
    in_progress: bool = False,
    readded_at: float | None = None,
) -> PartitionFacts:
    """The facts of `key` from the ledger rows near its range, `(start, end, landed_at)`: the
    range is landed when their union covers it, and its last landing is the latest of the rows
    that overlap it."""
    rng = range_of(key)
    if rng is None:
        return PartitionFacts(key, None, False, None, in_progress, readded_at)
    overlapping = [(s, e, t) for s, e, t in spans if s < rng.end and e > rng.start]
    landed = Coverage((s, e) for s, e, _ in overlapping).covers(rng.start, rng.end)
    times = [t for *_, t in overlapping]
    if run_activity is not None:
        times.append(run_activity)
    return PartitionFacts(key, rng, landed, max(times) if times else None, in_progress, readded_at)


def plan_retirement(
    facts: Sequence[PartitionFacts],
    *,
    now: float,
    policy: RetentionPolicy,
    beyond_bound: Collection[str] = (),
) -> Retirement:
    """Which of `facts` (oldest partition first) to retire now.

    Only a landed range with no run in progress is ever retired: once it is older than the
    retention (its last landing or run), or sooner when it is in `beyond_bound` (older than the
    newest `max_partitions` partitions). A range re-added for a backfill is kept for a whole
    retention from its re-adding, bound or not: the operator asked for it. At most
    `max_per_tick`, the oldest first.
    """
    cutoff = now - policy.retention_seconds
    kept: Counter = Counter()
    due: list[str] = []
    over = 0
    for fact in facts:
        if fact.range is None:
            kept[KEPT_FOREIGN] += 1
            continue
        if not fact.landed:
            kept[KEPT_UNLANDED] += 1
            continue
        if fact.in_progress:
            kept[KEPT_RUNNING] += 1
            continue
        if fact.readded_at is not None and fact.readded_at > cutoff:
            kept[KEPT_READDED] += 1
            continue
        beyond = fact.key in beyond_bound
        over += beyond
        old = fact.last_activity is None or fact.last_activity <= cutoff
        if old or beyond:
            due.append(fact.key)
        else:
            kept[KEPT_YOUNG] += 1
    if len(due) > policy.max_per_tick:
        kept[KEPT_DEFERRED] += len(due) - policy.max_per_tick
        due = due[: policy.max_per_tick]
    return Retirement(due, kept, over)


def describe(retirement: Retirement, looked_at: int, policy: RetentionPolicy) -> str:
    """One line for the sensor's tick: what it retired, what it kept and why, with figures."""
    hours = policy.retention_seconds / 3600
    bound = f"max {policy.max_partitions}" if policy.max_partitions else "no count bound"
    head = (
        f"retired {len(retirement.retire)} of {looked_at} partition(s) looked at"
        if retirement.retire
        else f"nothing to retire among {looked_at} partition(s) looked at"
    )
    kept = ", ".join(f"{n} {why}" for why, n in sorted(retirement.kept.items()))
    text = f"{head} (retention {hours:g}h, {bound}"
    if retirement.over_bound:
        text += f"; {retirement.over_bound} beyond the count bound"
    text += ")"
    return text + (f"; kept: {kept}" if kept else "")


# Backfill windows


class WindowError(Exception):
    """A backfill window that selects nothing, or cannot be mapped to offsets faithfully."""


def overlapping(ranges: Sequence[OffsetRange], start: int, end: int) -> list[OffsetRange]:
    """The ranges of one partition (sorted, disjoint) that share an offset with [start, end)."""
    if start >= end:
        return []
    starts = [r.start for r in ranges]
    # the last range starting before `start` may reach into the window; every later one that
    # starts before `end` does
    first = max(0, bisect.bisect_right(starts, start) - 1)
    stop = bisect.bisect_left(starts, end)
    return [r for r in ranges[first:stop] if r.end > start]


@dataclass(frozen=True)
class PartitionLog:
    """What Kafka says of one partition for a time window, and what Postgres holds below its
    log: enough to map the window to offsets, or to refuse to."""

    partition: int
    low: int  # the log start offset
    high: int  # the log end offset
    since_offset: int | None  # the first offset at or after `since` (None: no such record)
    until_offset: int | None  # the first offset at or after `until` (None: no such record)
    origin: int | None = None  # where the pipeline's first range of the partition starts
    # timestamp (ms) of the newest record stored below `low`, when the pipeline landed records
    # Kafka no longer has; None when there is none or it is unknown
    below_log_ts_ms: int | None = None


def offsets_of_window(log: PartitionLog, since_ms: int) -> tuple[int, int] | None:
    """The offsets [start, end) of the records of one partition in a time window, as Kafka's
    offsets-for-times gives them; None when the partition holds none.

    Kafka only knows the records still in its log. When the window may reach below the log
    start into records the pipeline landed and Kafka has deleted since, the mapping would miss
    them silently: that is refused (WindowError), naming the offset window to give instead.
    """
    end = log.high if log.until_offset is None else log.until_offset
    # the window starts at the log's first record (or after its last): the deleted records
    # before it may lie in the window too, unless the newest of them is older than `since`
    from_log_start = log.since_offset is None or log.since_offset <= log.low
    deleted_before = log.origin is not None and log.origin < log.low and from_log_start
    if deleted_before and (log.below_log_ts_ms is None or log.below_log_ts_ms >= since_ms):
        raise WindowError(
            f"the window reaches before Kafka's log of partition {log.partition}, which starts "
            f"at offset {log.low}: the records below it were deleted from Kafka (they are in "
            "Postgres), so their times cannot be mapped to offsets there. Give the offsets "
            f"instead: --partition {log.partition} --from-offset {log.origin} --to-offset {end}"
        )
    if log.since_offset is None:
        return None
    return (log.since_offset, end) if log.since_offset < end else None
