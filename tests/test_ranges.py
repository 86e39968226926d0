"""Range planning, keys and the contiguous prefix: pure unit tests."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orderflow_dagster.land.ranges import (
    OffsetRange,
    PartitionState,
    contiguous_end,
    merge_intervals,
    plan_partition,
    uncovered,
)


def state(low=0, high=0, frontier=None, inflight=0, partition=0):
    return PartitionState(partition, low, high, frontier, inflight)


def test_partition_key_round_trips_and_sorts_like_offsets():
    a = OffsetRange("orders.events", 3, 0, 10_000)
    b = OffsetRange("orders.events", 3, 10_000, 20_000)
    assert a.key == "orders.events|3|000000000000-000000010000"
    assert OffsetRange.from_key(a.key) == a
    assert sorted([b.key, a.key]) == [a.key, b.key]


@pytest.mark.parametrize("bad", ["", "orders.events|x|0-1", "orders.events|0|5-5", "a|0|9-3"])
def test_malformed_partition_keys_are_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError):
        OffsetRange.from_key(bad)


def test_first_plan_starts_at_the_low_watermark_and_cuts_at_max_events():
    ranges = plan_partition("t", state(low=5, high=25), max_events_per_batch=10, max_inflight=5)
    assert [(r.start, r.end) for r in ranges] == [(5, 15), (15, 25)]


def test_plan_continues_from_the_frontier_not_from_the_low_watermark():
    ranges = plan_partition(
        "t", state(low=0, high=30, frontier=20), max_events_per_batch=100, max_inflight=5
    )
    assert [(r.start, r.end) for r in ranges] == [(20, 30)]


def test_sensor_plans_no_range_while_max_inflight_ranges_are_unlanded():
    full = state(high=1000, frontier=20, inflight=2)
    assert plan_partition("t", full, max_events_per_batch=10, max_inflight=2) == []
    one_slot = state(high=1000, frontier=20, inflight=1)
    planned = plan_partition("t", one_slot, max_events_per_batch=10, max_inflight=2)
    assert [(r.start, r.end) for r in planned] == [(20, 30)]


def test_no_range_is_planned_when_the_lag_is_zero():
    assert (
        plan_partition("t", state(high=7, frontier=7), max_events_per_batch=5, max_inflight=3) == []
    )


def test_planned_ranges_are_contiguous_and_never_overlap():
    ranges = plan_partition("t", state(low=3, high=1001), max_events_per_batch=97, max_inflight=50)
    assert ranges[0].start == 3 and ranges[-1].end == 1001
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    assert all(r.size <= 97 for r in ranges)


def test_kafka_commit_never_passes_a_gap():
    # [0,10) and [20,30) landed, [10,20) did not: only the prefix up to 10 is safe
    assert contiguous_end(0, [(0, 10), (20, 30)]) == 10
    assert contiguous_end(0, [(20, 30), (0, 10), (10, 20)]) == 30


def test_kafka_commit_waits_while_the_first_range_has_not_landed():
    assert contiguous_end(0, [(10, 20)]) == 0
    assert contiguous_end(None, []) is None


def test_overlapping_ledger_ranges_still_give_the_right_prefix():
    assert contiguous_end(0, [(0, 10), (5, 15), (15, 16)]) == 16


def test_uncovered_returns_only_the_offsets_not_landed_yet():
    assert uncovered(0, 100, []) == [(0, 100)]
    assert uncovered(0, 100, [(0, 100)]) == []
    assert uncovered(0, 100, [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert uncovered(40, 60, [(0, 45), (55, 200)]) == [(45, 55)]


def test_merge_intervals_joins_touching_and_overlapping_spans():
    assert merge_intervals([(5, 7), (0, 5), (9, 10), (6, 8)]) == [(0, 8), (9, 10)]


partition_states = st.builds(
    lambda low, lag_before, lag, inflight: state(
        low=low,
        high=low + lag_before + lag,
        frontier=None if lag_before == 0 and inflight == 0 else low + lag_before,
        inflight=inflight,
    ),
    low=st.integers(0, 10**9),
    lag_before=st.integers(0, 10**6),
    lag=st.integers(0, 10**7),
    inflight=st.integers(0, 4),
)


@given(
    s=partition_states,
    max_events=st.integers(1, 10**6),
    min_events=st.integers(1, 10**6),
    max_inflight=st.integers(1, 6),
)
def test_planner_adapts_range_size_to_lag(s, max_events, min_events, max_inflight):
    """Whatever the lag: ranges are contiguous from the frontier, within the bound, and never a
    sliver while the partition is busy; a caught-up partition's lag goes out at once as one
    range; a partition far behind gets ranges of the bound."""
    ranges = plan_partition(
        "t",
        s,
        max_events_per_batch=max_events,
        max_inflight=max_inflight,
        min_events_per_batch=min_events,
    )
    start = s.frontier if s.frontier is not None else s.low_watermark
    lag = s.high_watermark - start
    slots = max(0, max_inflight - s.inflight)
    worth_a_run = min(min_events, max_events)
    assert len(ranges) <= slots
    assert all(r.size <= max_events for r in ranges)
    if ranges:
        assert ranges[0].start == start
        assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
        assert ranges[-1].end <= s.high_watermark
    # while something of the partition is in flight (or was just planned), no range is smaller
    # than what a run is worth
    for i, r in enumerate(ranges):
        if s.inflight > 0 or i > 0:
            assert r.size >= worth_a_run
    if slots == 0 or lag == 0:
        assert ranges == []
    elif s.inflight == 0 and lag <= max_events:
        # caught up: everything there is, at once, in one range
        assert [(r.start, r.end) for r in ranges] == [(start, s.high_watermark)]
    elif lag >= slots * max_events:
        # far behind: every free slot takes a range of the bound
        assert [r.size for r in ranges] == [max_events] * slots
    # the offsets left unplanned are either beyond the free slots or too few for a busy partition
    left = s.high_watermark - (ranges[-1].end if ranges else start)
    if left > 0 and len(ranges) < slots:
        assert (s.inflight > 0 or ranges) and left < worth_a_run


def test_busy_partition_waits_for_a_range_worth_a_run():
    busy = state(high=1_500, frontier=1_000, inflight=1)
    assert (
        plan_partition(
            "t", busy, max_events_per_batch=100_000, max_inflight=2, min_events_per_batch=1_000
        )
        == []
    )
    busy = state(high=2_000, frontier=1_000, inflight=1)
    planned = plan_partition(
        "t", busy, max_events_per_batch=100_000, max_inflight=2, min_events_per_batch=1_000
    )
    assert [(r.start, r.end) for r in planned] == [(1_000, 2_000)]
    idle = state(high=1_003, frontier=1_000, inflight=0)
    planned = plan_partition(
        "t", idle, max_events_per_batch=100_000, max_inflight=2, min_events_per_batch=1_000
    )
    assert [(r.start, r.end) for r in planned] == [(1_000, 1_003)]
