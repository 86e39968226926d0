"""Topic incarnations: pure unit tests of the stream names, the topic id rendering, the log-end
guard, the lost offsets of a retired stream and which stream may land."""

from __future__ import annotations

import base64

import pytest
from confluent_kafka import Uuid
from hypothesis import given
from hypothesis import strategies as st

from orderflow_dagster.land.incarnations import (
    Incarnation,
    IncarnationError,
    LogBehindLedgerError,
    StreamRetiredError,
    TopicRecreatedError,
    format_topic_id,
    log_behind,
    lost_spans,
    refuse_retired,
    stream_name,
)
from orderflow_dagster.land.planner import Plan
from orderflow_dagster.land.ranges import OffsetRange, PartitionState, kafka_topic, merge_intervals

INT64 = st.integers(-(2**63), 2**63 - 1)
# Kafka's legal topic characters
TOPICS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789._-", min_size=1, max_size=40)
TOPIC_IDS = st.builds(format_topic_id, INT64, INT64)


@given(INT64, INT64)
def test_a_topic_id_reads_as_kafka_prints_it(most, least):
    text = format_topic_id(most, least)
    # librdkafka renders the same 16 bytes in the other base64 alphabet
    assert text == str(Uuid(most, least)).replace("+", "-").replace("/", "_")
    assert len(text) == 22 and "@" not in text and "|" not in text
    raw = int.from_bytes(base64.urlsafe_b64decode(text + "=="), "big")
    assert raw == ((most % 2**64) << 64) | (least % 2**64)


@given(TOPICS, TOPIC_IDS, st.sets(TOPICS | st.just("x"), max_size=5), st.integers(0, 4))
def test_a_new_stream_is_named_after_its_topic_never_twice(topic, topic_id, others, restarts):
    taken = set(others)
    for _ in range(restarts + 1):
        name = stream_name(topic, topic_id, taken)
        assert name not in taken and name != topic
        assert kafka_topic(name) == topic
        taken.add(name)
        # its ranges' partition keys name it whole
        rng = OffsetRange(name, 3, 0, 10)
        assert OffsetRange.from_key(rng.key) == rng


def test_a_stream_name_is_refused_as_a_topic():
    with pytest.raises(ValueError):
        stream_name("orders@x", "id", [])


@given(
    st.dictionaries(st.integers(0, 8), st.none() | st.integers(0, 100), max_size=9),
    st.dictionaries(st.integers(0, 8), st.integers(0, 100), max_size=9),
)
def test_the_log_is_behind_exactly_where_the_ledger_passes_its_end_or_its_partition_is_gone(
    frontiers, log_ends
):
    behind = {b.partition: b for b in log_behind(frontiers, log_ends)}
    for p, reached in frontiers.items():
        expected = reached is not None and (p not in log_ends or reached > log_ends[p])
        assert (p in behind) == expected
        if expected:
            assert behind[p].reached == reached and behind[p].log_end == log_ends.get(p)
    text = str(LogBehindLedgerError("t", "id", list(behind.values())))
    assert "orderflow catch-up --new-stream" in text


spans = st.lists(
    st.tuples(st.integers(0, 60), st.integers(1, 20)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=6,
)


@given(
    st.dictionaries(st.integers(0, 3), spans, max_size=4),
    st.dictionaries(st.integers(0, 3), spans, max_size=4),
    st.dictionaries(st.integers(0, 3), st.integers(0, 100), max_size=4),
)
def test_a_retired_streams_lost_offsets_are_exactly_what_its_ledger_does_not_cover(
    planned_spans, landed, seen
):
    planned = {p: [OffsetRange("s", p, a, b) for a, b in v] for p, v in planned_spans.items() if v}
    landed = {p: v for p, v in landed.items() if v}
    lost = lost_spans("s", planned, landed, seen)
    for p in set(planned) | set(landed):
        starts = [a for a, _ in planned_spans.get(p, [])] + [a for a, _ in landed.get(p, [])]
        ends = [b for _, b in planned_spans.get(p, [])] + [b for _, b in landed.get(p, [])]
        origin, end = min(starts), max([*ends, seen.get(p, 0)])
        mine = [(r.start, r.end) for r in lost if r.partition == p]
        covered = {o for a, b in landed.get(p, []) for o in range(a, b)}
        lost_offsets = {o for a, b in mine for o in range(a, b)}
        # lost and landed never overlap, and together cover everything from origin to end
        assert not lost_offsets & covered
        assert lost_offsets | {o for o in covered if origin <= o < end} >= set(range(origin, end))
        assert all(origin <= o < end for o in lost_offsets)
        assert merge_intervals(mine) == sorted(mine)  # disjoint, not touching
    assert all(r.partition in set(planned) | set(landed) for r in lost)


X, Y = "AAAAAAAAAAAAAAAAAAAAAQ", "AAAAAAAAAAAAAAAAAAAAAg"


def test_only_the_stream_of_kafkas_current_incarnation_may_land():
    first, recreated = Incarnation("t", X), Incarnation(f"t@{Y}", Y)
    refuse_retired("r", f"t@{Y}", [first, recreated], Y)  # the current one: no error
    with pytest.raises(TopicRecreatedError) as old:
        refuse_retired("range t[0] 5..9", "t", [first, recreated], Y)
    assert f"now has id {Y}" in str(old.value) and f"as stream t@{Y}" in str(old.value)
    # re-created, and not planned since: no successor yet
    with pytest.raises(TopicRecreatedError) as unplanned:
        refuse_retired("r", "t", [first], Y)
    assert "as a stream of its own" in str(unplanned.value)
    # the same incarnation, restarted by an operator as a new stream
    restarted = Incarnation(f"t@{X}", X)
    with pytest.raises(StreamRetiredError) as retired:
        refuse_retired("r", "t", [first, restarted], X)
    assert not isinstance(retired.value, TopicRecreatedError)
    with pytest.raises(IncarnationError):
        refuse_retired("r", "t@unknown", [first], X)


def test_the_sensors_skip_reason_names_the_offsets_a_re_created_topic_took():
    lost = [OffsetRange("t", 0, 20, 25), OffsetRange("t", 2, 3, 4)]
    plan = Plan(f"t@{Y}", [], [], {0: PartitionState(0, 0, 9, 9, 0)}, Y, None, lost)
    reason = plan.skip_reason(2)
    assert reason.startswith(f"lag=0 on t@{Y}; 6 offset(s) of t")
    assert "t[0] 20..25, t[2] 3..4" in reason and "orderflow ack-loss" in reason
    assert Plan("t", [], [], {}).skip_reason(2) == "lag=0 on t"
