"""How far `orders.status` got: the highest changelog_seq of its committed messages.

Each transaction publishes a contiguous block of changelog rows and commits atomically, so the
largest `changelog_seq` among the last committed message of every partition is exactly the
position to continue from. Transaction markers occupy offsets and aborted messages are skipped by
a read_committed consumer, so each partition is scanned back from its last stable offset in
growing windows until a data message (or the partition's start) is found.
"""

from __future__ import annotations

import json
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from orderflow_dagster.ingest.errors import from_kafka_error
from orderflow_dagster.ingest.kafka_config import consumer_config

FIRST_WINDOW = 64
POLL_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 30.0


def changelog_seq(value: bytes) -> int:
    return int(json.loads(value)["changelog_seq"])


def published_position(bootstrap: str, topic: str) -> int:
    """The highest changelog_seq committed to `topic`; 0 for an empty topic."""
    # a throwaway group: offsets are assigned, never committed
    consumer = Consumer(consumer_config(bootstrap, f"orderflow-publish-position-{uuid.uuid4()}"))
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None:
            raise from_kafka_error(
                meta.error if meta else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART),
                f"cannot read the position of {topic}",
            )
        return max((_last_seq(consumer, topic, p) for p in meta.partitions), default=0)
    except KafkaException as exc:
        raise from_kafka_error(exc.args[0], f"cannot read the position of {topic}") from exc
    finally:
        consumer.close()


def _last_seq(consumer: Consumer, topic: str, partition: int) -> int:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    window = FIRST_WINDOW
    end = high
    while end > low:
        start = max(low, end - window)
        found = _last_in(consumer, topic, partition, start, end)
        if found is not None:
            return found
        end, window = start, window * 2
    return 0


def _last_in(consumer: Consumer, topic: str, partition: int, start: int, end: int) -> int | None:
    """The changelog_seq of the last committed data message in offsets [start, end)."""
    consumer.assign([TopicPartition(topic, partition, start)])
    last = None
    try:
        while True:
            msg = consumer.poll(POLL_TIMEOUT_S)
            if msg is None:
                # an idle poll: past the end already, or a fetch still on its way
                position = consumer.position([TopicPartition(topic, partition)])[0].offset
                if position >= end:
                    return last
                continue
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return last
                raise from_kafka_error(msg.error(), f"reading {topic}[{partition}]")
            if msg.offset() >= end:
                return last
            last = changelog_seq(msg.value())
            if msg.offset() + 1 >= end:
                return last
    finally:
        consumer.unassign()
