"""Offset ranges: the unit of planning, landing and backfilling. Pure functions only.

A range is half-open, `[start, end)`, on one Kafka partition. Its partition key is deterministic
(`orders.events|0|000000000000-000000010000`), so planning the same range twice names the same
Dagster partition and the same run key, and sorting keys sorts ranges.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KEY_SEPARATOR = "|"
OFFSET_DIGITS = 12
# A range's `topic` names a stream: the Kafka topic itself for the first incarnation of the topic
# orderflow saw, `<topic>@<topic id>` for a later one (a deleted and re-created topic), so that
# each incarnation's offsets have coordinates of their own. Kafka topic names cannot hold '@'.
INCARNATION_SEPARATOR = "@"


def kafka_topic(stream: str) -> str:
    """The Kafka topic a stream (or a bare topic name) reads from."""
    return stream.split(INCARNATION_SEPARATOR, 1)[0]


@dataclass(frozen=True, order=True)
class OffsetRange:
    topic: str
    partition: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.partition < 0:
            raise ValueError(f"negative Kafka partition {self.partition}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid offset range [{self.start}, {self.end})")
        if KEY_SEPARATOR in self.topic:
            raise ValueError(f"topic {self.topic!r} contains {KEY_SEPARATOR!r}")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def key(self) -> str:
        return (
            f"{self.topic}{KEY_SEPARATOR}{self.partition}{KEY_SEPARATOR}"
            f"{self.start:0{OFFSET_DIGITS}d}-{self.end:0{OFFSET_DIGITS}d}"
        )

    @classmethod
    def from_key(cls, key: str) -> OffsetRange:
        try:
            topic, partition, span = key.rsplit(KEY_SEPARATOR, 2)
            start, end = span.split("-")
            return cls(topic, int(partition), int(start), int(end))
        except ValueError as exc:
            raise ValueError(
                f"not an offset-range partition key: {key!r} (expected 'topic|partition|start-end')"
            ) from exc

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}] {self.start}..{self.end}"


def merge_intervals(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of half-open intervals, sorted; touching intervals are joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


class Coverage:
    """The union of some half-open intervals, to ask whether it covers others (bisection)."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        self.merged = merge_intervals(spans)
        self._starts = [s for s, _ in self.merged]

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self.merged[i][1] >= end


def uncovered(start: int, end: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) not inside any of the `covered` intervals."""
    gaps: list[tuple[int, int]] = []
    cursor = start
    for c_start, c_end in merge_intervals(covered):
        if c_end <= cursor:
            continue
        if c_start >= end:
            break
        if c_start > cursor:
            gaps.append((cursor, c_start))
        cursor = max(cursor, c_end)
        if cursor >= end:
            break
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


def contiguous_end(origin: int | None, landed: Iterable[tuple[int, int]]) -> int | None:
    """End of the landed prefix that starts at `origin`: the offset safe to commit to Kafka.

    Ranges can land out of order; committing past a range that has not landed would tell Kafka
    that offsets are consumed when they are not. Returns `origin` itself when the first range has
    not landed yet, and None when nothing was ever planned.
    """
    if origin is None:
        return None
    end = origin
    for start, stop in merge_intervals(landed):
        if start > end:
            break
        end = max(end, stop)
    return end


@dataclass(frozen=True)
class PartitionState:
    """What the planner knows about one Kafka partition at one moment."""

    partition: int
    low_watermark: int
    high_watermark: int
    # max end over the ledger and the planned ranges; None if this partition was never planned
    frontier: int | None
    inflight: int  # planned ranges not landed yet


def plan_partition(
    topic: str,
    state: PartitionState,
    *,
    max_events_per_batch: int,
    max_inflight: int,
    min_events_per_batch: int = 1,
) -> list[OffsetRange]:
    """New contiguous ranges for one partition, from its frontier up to the high watermark.

    Sized by lag: each range takes everything there is, up to `max_events_per_batch` (landing
    streams in chunks, so the bound is about run length, not memory). A caught-up partition gets
    one small range at once, for latency; a partition that is behind gets ranges of the bound.
    While a range of the partition is in flight, a new one is planned only once at least
    `min_events_per_batch` offsets wait (capped at the bound): a run costs seconds to start, so
    a sliver would cost more than it lands, and the offsets it would hold go into the next range.

    Backpressure: no more than `max_inflight` unlanded ranges per partition at once. A partition
    never planned before starts at its low watermark (the oldest offset still in the log).
    """
    if max_events_per_batch < 1:
        raise ValueError("max_events_per_batch must be at least 1")
    if max_inflight < 1:
        raise ValueError("max_inflight must be at least 1")
    if min_events_per_batch < 1:
        raise ValueError("min_events_per_batch must be at least 1")
    worth_a_run = min(min_events_per_batch, max_events_per_batch)
    start = state.frontier if state.frontier is not None else state.low_watermark
    slots = max_inflight - state.inflight
    busy = state.inflight > 0
    planned: list[OffsetRange] = []
    while slots > 0 and start < state.high_watermark:
        if busy and state.high_watermark - start < worth_a_run:
            break
        end = min(start + max_events_per_batch, state.high_watermark)
        planned.append(OffsetRange(topic, state.partition, start, end))
        start = end
        slots -= 1
        busy = True
    return planned


def lag(state: PartitionState) -> int:
    """Offsets in the log beyond everything planned (what the planner has yet to cover)."""
    start = state.frontier if state.frontier is not None else state.low_watermark
    return max(0, state.high_watermark - start)
