"""Planning offset ranges: Kafka watermarks + the plan and ledger in Postgres -> new ranges.

Reads only watermarks (never payloads), so a tick costs a few round trips whatever the lag. The
topic's planning lock makes concurrent planners (the sensor, `orderflow catch-up`) hand out
disjoint ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from confluent_kafka import Consumer

from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.ranges import OffsetRange, PartitionState, lag, plan_partition


@dataclass(frozen=True)
class Plan:
    topic: str
    new: list[OffsetRange]  # planned by this call
    unlanded: list[OffsetRange]  # every planned range not landed yet, including `new`
    states: dict[int, PartitionState]  # as seen before this call planned

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
            return f"lag=0 on {self.topic}"
        blocked = sorted(
            p for p, s in self.states.items() if s.inflight >= max_inflight and lag(s) > 0
        )
        text = (
            f"lag={self.lag + self.unlanded_offsets} on {self.topic}: "
            f"{len(self.unlanded)} range(s) in flight, none new to launch"
        )
        if blocked:
            text += f"; backpressure (max_inflight={max_inflight}) on partition(s) {blocked}"
        return text


def plan_ranges(
    conn: psycopg.Connection,
    consumer: Consumer,
    topic: str,
    *,
    max_events_per_batch: int,
    max_inflight: int,
) -> Plan:
    parts = kafka_source.partitions(consumer, topic)
    marks = kafka_source.watermarks(consumer, topic, parts)
    with conn.transaction():
        store.lock_topic_for_planning(conn, topic)
        progress = store.topic_progress(conn, topic)
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
                topic,
                states[p],
                max_events_per_batch=max_events_per_batch,
                max_inflight=max_inflight,
            )
        ]
        store.record_plan(conn, new)
    return Plan(topic, new, sorted(progress.unlanded() + new), states)
