"""Planning offset ranges: Kafka watermarks + the plan and ledger in Postgres -> new ranges.

Reads only watermarks and the topic id (never payloads), so a tick costs a few round trips
whatever the lag; and of the plan and the ledger only each partition's ledger watermark and the
rows above it (raw.ingest_watermarks), so it costs the same whatever the history. The topic's
planning lock makes concurrent planners (the sensor, `orderflow catch-up`) hand out disjoint
ranges and register each incarnation of the topic once.

Ranges are planned for the topic's current stream (see incarnations.py): a deleted and
re-created topic is planned from its low watermark as a stream of its own, and a log that ends
below the ledger stops planning with LogBehindLedgerError instead of being planned around.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from confluent_kafka import Consumer

from orderflow_dagster.land import incarnations, kafka_source, store
from orderflow_dagster.land.incarnations import (
    Incarnation,
    IncarnationError,
    LogBehindLedgerError,
)
from orderflow_dagster.land.ranges import (
    INCARNATION_SEPARATOR,
    OffsetRange,
    PartitionState,
    kafka_topic,
    lag,
    plan_partition,
)


@dataclass(frozen=True)
class Plan:
    topic: str  # the stream planned: the Kafka topic's current incarnation
    new: list[OffsetRange]  # planned by this call
    unlanded: list[OffsetRange]  # every planned range not landed yet, including `new`
    states: dict[int, PartitionState]  # as seen before this call planned
    topic_id: str | None = None
    registered: str | None = None  # why this call registered the stream, if it did
    # offsets of retired streams of the topic never landed nor acknowledged
    lost: list[OffsetRange] = field(default_factory=list)

    @property
    def lag(self) -> int:
        """Offsets in the log that no range covers yet (after this plan)."""
        planned = {p: sum(r.size for r in self.new if r.partition == p) for p in self.states}
        return sum(max(0, lag(s) - planned[p]) for p, s in self.states.items())

    @property
    def unlanded_offsets(self) -> int:
        return sum(r.size for r in self.unlanded)

    def skip_reason(self, max_inflight: int) -> str:
        if not self.unlanded:
            return f"lag=0 on {self.topic}{self.lost_note()}"
        blocked = sorted(
            p for p, s in self.states.items() if s.inflight >= max_inflight and lag(s) > 0
        )
        text = (
            f"lag={self.lag + self.unlanded_offsets} on {self.topic}: "
            f"{len(self.unlanded)} range(s) in flight, none new to launch"
        )
        if blocked:
            text += f"; backpressure (max_inflight={max_inflight}) on partition(s) {blocked}"
        return text + self.lost_note()

    def lost_note(self) -> str:
        return f"; {lost_message(self.lost)}" if self.lost else ""


def lost_message(lost: list[OffsetRange]) -> str:
    """What the operator reads about offsets a re-created topic took with it."""
    return (
        f"{sum(r.size for r in lost)} offset(s) of {kafka_topic(lost[0].topic)} "
        "were planned or seen in Kafka but never landed before the topic was re-created, and "
        f"are gone with it: {incarnations.describe_ranges(lost)}. Check whether their source can "
        "produce them again, then acknowledge them with `orderflow ack-loss` "
        f"(see {incarnations.RUNBOOK})"
    )


def plan_ranges(
    conn: psycopg.Connection,
    consumer: Consumer,
    topic: str,
    *,
    max_events_per_batch: int,
    max_inflight: int,
    min_events_per_batch: int = 1,
    new_stream: bool = False,
) -> Plan:
    """Plan the topic's current stream. `new_stream`: an operator's decision to land Kafka's
    log as a new stream from its start, allowed only while the log ends below the ledger."""
    if INCARNATION_SEPARATOR in topic:
        raise ValueError(f"plan a Kafka topic, not a stream: {topic!r}")
    parts = kafka_source.partitions(consumer, topic)
    marks = kafka_source.watermarks(consumer, topic, parts)
    topic_id = kafka_source.topic_id(consumer, topic)
    log_ends = {p: marks[p][1] for p in parts}
    with conn.transaction():
        store.lock_topic_for_planning(conn, topic)
        inc, registered = _incarnation(conn, topic, topic_id)
        progress = store.progress_above_watermark(conn, inc.stream)
        behind = incarnations.log_behind(
            {p: progress.frontier(p) for p in progress.partitions()}, log_ends
        )
        if new_stream:
            if not behind:
                raise IncarnationError(
                    f"refusing to start a new stream: Kafka's log of {topic} continues stream "
                    f"{inc.stream} (no partition ends below its ledger), which lands it as usual"
                )
            old = inc.stream
            known = [i.stream for i in store.incarnations(conn, topic)]
            registered = (
                f"new stream started by an operator: the log ended below the ledger of {old} "
                f"({'; '.join(str(b) for b in behind)})"
            )
            inc = store.register_incarnation(
                conn, topic, topic_id, incarnations.stream_name(topic, topic_id, known), registered
            )
            progress = store.TopicProgress({}, {})
        elif behind:
            raise LogBehindLedgerError(inc.stream, topic_id, behind)
        states = {
            p: PartitionState(
                partition=p,
                low_watermark=marks[p][0],
                high_watermark=marks[p][1],
                frontier=progress.frontier(p),
                inflight=len(progress.unlanded(p)),
            )
            for p in parts
        }
        new = [
            r
            for p in parts
            for r in plan_partition(
                inc.stream,
                states[p],
                max_events_per_batch=max_events_per_batch,
                max_inflight=max_inflight,
                min_events_per_batch=min_events_per_batch,
            )
        ]
        store.record_plan(conn, new, topic_id)
        reached = {
            p: max((r.end for r in new if r.partition == p), default=states[p].frontier)
            for p in parts
        }
        store.record_high_watermarks(conn, inc, log_ends, reached)
        lost = lost_to_recreation(conn, topic, inc.stream)
    return Plan(
        inc.stream, new, sorted(progress.unlanded() + new), states, topic_id, registered, lost
    )


def _incarnation(
    conn: psycopg.Connection, topic: str, topic_id: str
) -> tuple[Incarnation, str | None]:
    """The stream of Kafka's incarnation `topic_id`, registering it when it is new, and why it
    was registered. Under the topic's planning lock."""
    known = store.incarnations(conn, topic)
    found = incarnations.current(known, topic_id)
    if found is not None:
        return found, None
    if not known:
        # the first incarnation seen keeps the bare name, so a deployment whose ledger
        # predates topic ids goes on under the same coordinates
        reason = "first seen"
        return store.register_incarnation(conn, topic, topic_id, topic, reason), reason
    latest = known[-1]
    if not store.has_ranges(conn, latest.stream):
        # nothing was planned from the old incarnation: no coordinates to keep apart
        reason = f"topic re-created before anything was planned (was {latest.topic_id})"
        store.reassign_incarnation(conn, latest.stream, topic_id, reason)
        return Incarnation(latest.stream, topic_id), reason
    reason = f"topic re-created: incarnation {topic_id} follows {latest.topic_id}"
    stream = incarnations.stream_name(topic, topic_id, [i.stream for i in known])
    return store.register_incarnation(conn, topic, topic_id, stream, reason), reason


def register_current(conn: psycopg.Connection, consumer: Consumer, topic: str) -> Incarnation:
    """Register Kafka's current incarnation of `topic` if planning never did (a range planned
    before topic ids were recorded, landed before the next planning)."""
    topic_id = kafka_source.topic_id(consumer, topic)
    with conn.transaction():
        store.lock_topic_for_planning(conn, topic)
        return _incarnation(conn, topic, topic_id)[0]


def current_incarnation(
    conn: psycopg.Connection, consumer: Consumer, topic: str
) -> tuple[str, Incarnation | None]:
    """Kafka's topic id for `topic` and the stream registered for it (None if planning has not
    registered it yet). Read-only."""
    topic_id = kafka_source.topic_id(consumer, topic)
    return topic_id, incarnations.current(store.incarnations(conn, topic), topic_id)


def lost_to_recreation(
    conn: psycopg.Connection, topic: str, current_stream: str | None
) -> list[OffsetRange]:
    """The offsets the topic's retired streams planned or saw and never landed (see
    incarnations.lost_spans): from their watermarks and the rows above them, so a tick reads no
    history of theirs either."""
    lost = []
    for inc in store.incarnations(conn, topic):
        if inc.stream == current_stream:
            continue
        progress = store.progress_above_watermark(conn, inc.stream)
        lost += incarnations.lost_spans(
            inc.stream, progress.planned, progress.landed, inc.high_watermarks
        )
    return lost
