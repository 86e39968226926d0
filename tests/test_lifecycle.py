"""The partition lifecycle's pure decisions: which partitions retention retires, which ranges a
backfill window selects, and how a time window maps to offsets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orderflow_dagster.land import lifecycle
from orderflow_dagster.land.lifecycle import (
    PartitionFacts,
    PartitionLog,
    RetentionPolicy,
    WindowError,
    facts_for,
    offsets_of_window,
    overlapping,
    plan_retirement,
)
from orderflow_dagster.land.ranges import OffsetRange

HOUR = 3600.0
NOW = 1_800_000_000.0
POLICY = RetentionPolicy(retention_seconds=24 * HOUR, max_partitions=0, max_per_tick=100)


def key(start: int, end: int, partition: int = 0) -> str:
    return OffsetRange("orders.events", partition, start, end).key


def landed(start: int, end: int, age_hours: float, **kw) -> PartitionFacts:
    k = key(start, end)
    return PartitionFacts(k, OffsetRange.from_key(k), True, NOW - age_hours * HOUR, **kw)


# which partitions are retired


def test_only_landed_ranges_older_than_the_retention_are_retired():
    facts = [
        landed(0, 10, age_hours=30),
        PartitionFacts(key(10, 20), OffsetRange.from_key(key(10, 20)), False, None),
        landed(20, 30, age_hours=30, in_progress=True),
        landed(30, 40, age_hours=2),
        PartitionFacts("not-a-range", None, False, None),
        landed(40, 50, age_hours=25),
    ]
    decision = plan_retirement(facts, now=NOW, policy=POLICY)
    assert decision.retire == [key(0, 10), key(40, 50)]
    assert decision.kept == {
        lifecycle.KEPT_UNLANDED: 1,
        lifecycle.KEPT_RUNNING: 1,
        lifecycle.KEPT_YOUNG: 1,
        lifecycle.KEPT_FOREIGN: 1,
    }


def test_beyond_the_count_bound_young_landed_ranges_go_but_never_unlanded_ones():
    facts = [
        landed(0, 10, age_hours=1),
        PartitionFacts(key(10, 20), OffsetRange.from_key(key(10, 20)), False, None),
        landed(20, 30, age_hours=1),
    ]
    bound = RetentionPolicy(24 * HOUR, max_partitions=1, max_per_tick=100)
    decision = plan_retirement(facts, now=NOW, policy=bound, beyond_bound={key(0, 10), key(10, 20)})
    assert decision.retire == [key(0, 10)]
    assert decision.over_bound == 1
    assert decision.kept == {lifecycle.KEPT_UNLANDED: 1, lifecycle.KEPT_YOUNG: 1}


def test_a_range_re_added_for_a_backfill_is_kept_a_whole_retention_even_beyond_the_bound():
    fresh = landed(0, 10, age_hours=100, readded_at=NOW - 3 * HOUR)
    stale = landed(10, 20, age_hours=100, readded_at=NOW - 25 * HOUR)
    decision = plan_retirement(
        [fresh, stale], now=NOW, policy=POLICY, beyond_bound={fresh.key, stale.key}
    )
    assert decision.retire == [stale.key]
    assert decision.kept == {lifecycle.KEPT_READDED: 1}


def test_a_tick_retires_at_most_its_bound_the_oldest_first_and_counts_the_rest():
    facts = [landed(i * 10, i * 10 + 10, age_hours=48) for i in range(7)]
    small = RetentionPolicy(24 * HOUR, max_partitions=0, max_per_tick=3)
    decision = plan_retirement(facts, now=NOW, policy=small)
    assert decision.retire == [f.key for f in facts[:3]]
    assert decision.kept == {lifecycle.KEPT_DEFERRED: 4}


def test_the_tick_message_gives_the_figures():
    facts = [landed(0, 10, age_hours=48), landed(10, 20, age_hours=1)]
    decision = plan_retirement(facts, now=NOW, policy=POLICY)
    text = lifecycle.describe(decision, 2, POLICY)
    assert text == (
        "retired 1 of 2 partition(s) looked at (retention 24h, no count bound); "
        "kept: 1 younger than the retention"
    )
    idle = lifecycle.describe(plan_retirement([], now=NOW, policy=POLICY), 0, POLICY)
    assert idle.startswith("nothing to retire among 0 partition(s) looked at")


@pytest.mark.parametrize(
    "policy",
    [
        dict(retention_seconds=-1, max_partitions=0, max_per_tick=1),
        dict(retention_seconds=0, max_partitions=-1, max_per_tick=1),
        dict(retention_seconds=0, max_partitions=0, max_per_tick=0),
    ],
)
def test_a_policy_that_cannot_hold_is_refused(policy):
    with pytest.raises(ValueError):
        RetentionPolicy(**policy)


facts_strategy = st.lists(
    st.builds(
        lambda i, is_landed, age, running, readded, foreign: PartitionFacts(
            f"foreign-{i}" if foreign else key(i * 10, i * 10 + 10),
            None if foreign else OffsetRange.from_key(key(i * 10, i * 10 + 10)),
            is_landed,
            None if age is None else NOW - age * HOUR,
            running,
            None if readded is None else NOW - readded * HOUR,
        ),
        st.integers(0, 10_000),
        st.booleans(),
        st.one_of(st.none(), st.floats(0, 100)),
        st.booleans(),
        st.one_of(st.none(), st.floats(0, 100)),
        st.booleans(),
    ),
    max_size=40,
    unique_by=lambda f: f.key,
)


@given(
    facts_strategy,
    st.floats(0, 50),
    st.integers(1, 10),
    st.data(),
)
def test_retirement_never_touches_what_is_unlanded_running_or_held(facts, hours, per_tick, data):
    policy = RetentionPolicy(hours * HOUR, max_partitions=3, max_per_tick=per_tick)
    beyond = set(data.draw(st.lists(st.sampled_from([f.key for f in facts] or ["x"]))))
    decision = plan_retirement(facts, now=NOW, policy=policy, beyond_bound=beyond)
    by_key = {f.key: f for f in facts}
    cutoff = NOW - policy.retention_seconds
    assert len(decision.retire) <= per_tick
    # oldest first: the order the partitions were given in
    order = [f.key for f in facts]
    assert decision.retire == sorted(decision.retire, key=order.index)
    for k in decision.retire:
        fact = by_key[k]
        assert fact.range is not None and fact.landed and not fact.in_progress
        assert fact.readded_at is None or fact.readded_at <= cutoff
        assert k in beyond or fact.last_activity is None or fact.last_activity <= cutoff
    assert len(decision.retire) + sum(decision.kept.values()) == len(facts)


# what retention knows of a range, from the ledger rows near it


def test_a_range_is_landed_when_ledger_rows_cover_it_together():
    # an acknowledged loss splits a range's ledger row in two; the previous range's row is near
    spans = [(0, 10, 100.0), (10, 14, 200.0), (14, 20, 300.0)]
    fact = facts_for(key(10, 20), spans, run_activity=250.0)
    assert fact.landed and fact.last_activity == 300.0
    assert facts_for(key(10, 20), [(10, 14, 1.0)]).landed is False
    assert facts_for(key(10, 20), []).last_activity is None
    # the row of the range before is not this range's landing
    assert facts_for(key(10, 20), [(0, 10, 999.0), (10, 20, 5.0)]).last_activity == 5.0
    assert facts_for("orders.events|not|a-range", spans).range is None


# which ranges a window selects

ranges_strategy = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 30)), max_size=30).map(
    lambda steps: [OffsetRange("t", 0, start, start + size) for start, size in _layout(steps)]
)


def _layout(steps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Disjoint, sorted (start, size) pairs from (gap, size) steps."""
    out, cursor = [], 0
    for gap, size in steps:
        cursor += gap
        out.append((cursor, size))
        cursor += size
    return out


@given(ranges_strategy, st.integers(0, 700), st.integers(0, 700))
def test_a_window_selects_exactly_the_ranges_that_share_an_offset_with_it(ranges, a, b):
    start, end = min(a, b), max(a, b)
    expected = [r for r in ranges if set(range(r.start, r.end)) & set(range(start, end))]
    assert overlapping(ranges, start, end) == expected


# mapping a time window to offsets


@st.composite
def kafka_logs(draw):
    """A partition's records with non-decreasing timestamps from the pipeline's origin, the
    first `deleted` of them gone from Kafka (stored in Postgres), and a time window."""
    origin = draw(st.integers(0, 5))
    gaps = draw(st.lists(st.integers(0, 3), max_size=25))
    stamps, t = [], 1_000
    for g in gaps:
        t += g
        stamps.append(t)
    deleted = draw(st.integers(0, len(stamps)))
    since = draw(st.integers(990, t + 5))
    until = draw(st.integers(since + 1, t + 10))
    return origin, stamps, deleted, since, until


def first_at_or_after(stamps, origin, low, ts):
    for i in range(low - origin, len(stamps)):
        if stamps[i] >= ts:
            return origin + i
    return None


@given(kafka_logs())
def test_a_time_window_maps_to_its_records_offsets_or_is_refused_when_kafka_cannot_tell(log):
    origin, stamps, deleted, since, until = log
    low, high = origin + deleted, origin + len(stamps)
    partition_log = PartitionLog(
        0,
        low,
        high,
        first_at_or_after(stamps, origin, low, since),
        first_at_or_after(stamps, origin, low, until),
        origin=origin if stamps else None,
        below_log_ts_ms=stamps[deleted - 1] if deleted else None,
    )
    in_window = [origin + i for i, ts in enumerate(stamps) if since <= ts < until]
    missed = [o for o in in_window if o < low]
    try:
        span = offsets_of_window(partition_log, since)
    except WindowError:
        # refused only when records Kafka deleted may lie in the window
        assert deleted and stamps[deleted - 1] >= since
        return
    # never silently short of a record the pipeline landed and Kafka deleted
    assert not missed
    live = [o for o in in_window if o >= low]
    assert span == ((live[0], live[-1] + 1) if live else None)
