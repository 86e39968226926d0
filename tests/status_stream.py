"""Reading orders.status back, read_committed, and folding it into the history it describes."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition
from psycopg import sql

from orderflow_dagster.ingest.kafka_config import consumer_config

FIELDS = ("status", "previous_status", "event_id", "transitioned_at", "trace_id")


def read_stream(bootstrap: str, topic: str) -> list[dict]:
    """Every committed message of `topic`, partition by partition, in offset order."""
    consumer = Consumer(consumer_config(bootstrap, f"status-reader-{uuid.uuid4()}"))
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        out = []
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            while True:
                msg = consumer.poll(10)
                assert msg is not None, f"{topic}[{p}] stalled before its end"
                if msg.error() is not None:
                    assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                    break
                value = json.loads(msg.value())
                assert msg.key().decode() == value["order_id"]
                out.append(value | {"_partition": p})
            consumer.unassign()
        return out
    finally:
        consumer.close()


def fold(messages: list[dict]) -> dict[tuple[str, int], tuple]:
    """The latest message per (order_id, sequence_number), retracted ones removed."""
    latest: dict[tuple[str, int], dict] = {}
    for msg in sorted(messages, key=lambda m: m["changelog_seq"]):
        latest[(msg["order_id"], msg["sequence_number"])] = msg
    return {
        key: tuple(msg[f] for f in FIELDS)
        for key, msg in latest.items()
        if msg["kind"] != "retraction"
    }


def history(dsn: str, schema: str = "analytics") -> dict[tuple[str, int], tuple]:
    """order_status_history with each event's trace_id, as `fold` gives it."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL(
                "select h.order_id, h.sequence_number, h.status, h.previous_status,"
                " h.event_id::text, h.transitioned_at, e.trace_id"
                " from {} h left join {} e using (event_id)"
            ).format(
                sql.Identifier(schema, "order_status_history"),
                sql.Identifier(schema, "order_events"),
            )
        ).fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5].astimezone(UTC).isoformat(), r[6]) for r in rows}


def assert_exact(messages: list[dict], expected: dict[tuple[str, int], tuple]) -> None:
    """The stream folds to `expected`; no changelog row twice; per order, in changelog order;
    a second message for a sequence number only where its content changed."""
    seqs = Counter(m["changelog_seq"] for m in messages)
    assert [s for s, n in seqs.items() if n > 1] == []
    by_order: dict[str, list[dict]] = {}
    for msg in messages:
        by_order.setdefault(msg["order_id"], []).append(msg)
    for order, msgs in by_order.items():
        assert len({m["_partition"] for m in msgs}) == 1, order
        order_seqs = [m["changelog_seq"] for m in msgs]
        assert order_seqs == sorted(order_seqs), order
        last: dict[int, dict] = {}
        for msg in msgs:
            before = last.get(msg["sequence_number"])
            if before is None:
                assert msg["kind"] == "transition", msg
            else:
                assert msg["kind"] in ("correction", "retraction"), msg
                assert before["kind"] == "retraction" or tuple(before[f] for f in FIELDS) != tuple(
                    msg[f] for f in FIELDS
                ), (before, msg)
            last[msg["sequence_number"]] = msg
    assert fold(messages) == expected


def stream_faults(messages: list[dict], expected: dict[tuple[str, int], tuple]) -> tuple[int, int]:
    """(lost, duplicated) for the fault report: transitions of `expected` the folded stream
    lacks or gets wrong (and extra ones), and changelog rows published more than once."""
    folded = fold(messages)
    lost = sum(1 for key, value in expected.items() if folded.get(key) != value)
    lost += sum(1 for key in folded if key not in expected)
    seqs = Counter(m["changelog_seq"] for m in messages)
    return lost, sum(n - 1 for n in seqs.values())
