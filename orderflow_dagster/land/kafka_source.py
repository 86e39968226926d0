"""The Kafka side of landing: offsets, watermarks, reading exactly one range, committing.

Reading uses `assign` + an explicit start offset, never a subscription: a range is a fixed slice
of the log, and group rebalances must not move it. The consumer group is only used to publish the
committed offsets (after Postgres commits) so standard lag tooling sees our progress.

Every function takes a stream name (see ranges.INCARNATION_SEPARATOR) or a bare topic name, and
talks to Kafka about the topic it names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from orderflow_dagster.ingest.errors import KafkaUnavailableError, OffsetsLostError
from orderflow_dagster.ingest.kafka_config import admin_config, consumer_config
from orderflow_dagster.land.incarnations import ZERO_TOPIC_ID, IncarnationError, format_topic_id
from orderflow_dagster.land.ranges import kafka_topic

_LOST = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}


class LandingConsumer(Consumer):
    """A consumer that can also ask the cluster's admin API (for topic ids), and remembers which
    stream its assignment was positioned for."""

    def __init__(self, config: dict, admin: dict) -> None:
        super().__init__(config)
        self.admin_config = admin
        self.positioned_stream: str | None = None


def open_consumer(
    bootstrap_servers: str, group_id: str, extra: dict | None = None
) -> LandingConsumer:
    return LandingConsumer(
        consumer_config(bootstrap_servers, group_id, extra), admin_config(bootstrap_servers, extra)
    )


# One admin client per configuration and process: creating one costs a connection and a
# metadata round trip, a topic id lookup on an open one about a millisecond.
_ADMINS: dict[tuple, AdminClient] = {}
_ADMINS_LOCK = threading.Lock()


def _admin(consumer: Consumer) -> AdminClient:
    config = getattr(consumer, "admin_config", None)
    if config is None:
        raise TypeError("topic ids need a consumer from kafka_source.open_consumer")
    key = tuple(sorted((k, str(v)) for k, v in config.items()))
    with _ADMINS_LOCK:
        admin = _ADMINS.get(key)
        if admin is None:
            admin = _ADMINS[key] = AdminClient(config)
    return admin


def topic_id(consumer: Consumer, topic: str, timeout: float = 10.0) -> str:
    """Kafka's id of the topic's current incarnation, as Kafka prints it."""
    name = kafka_topic(topic)
    future = _admin(consumer).describe_topics(TopicCollection([name]), request_timeout=timeout)[
        name
    ]
    try:
        description = future.result(timeout=timeout + 5)
    except KafkaException as exc:
        raise _unavailable(f"cannot describe topic {name}", exc) from exc
    uuid = description.topic_id
    text = format_topic_id(uuid.get_most_significant_bits(), uuid.get_least_significant_bits())
    if text == ZERO_TOPIC_ID:
        raise IncarnationError(
            f"the broker reports no topic id for {name}: orderflow needs topic ids (Kafka 2.8 or "
            "later) to tell a re-created topic from the one it landed"
        )
    return text


def _unavailable(what: str, exc: KafkaException) -> KafkaUnavailableError:
    return KafkaUnavailableError(exc.args[0] if exc.args else KafkaError(KafkaError._FAIL, what))


def partitions(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    topic = kafka_topic(topic)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise _unavailable(f"cannot list topic {topic}", exc) from exc
    meta = metadata.topics.get(topic)
    if meta is None or meta.error is not None:
        raise KafkaUnavailableError(
            meta.error if meta is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
        )
    return sorted(meta.partitions)


def watermarks(
    consumer: Consumer, topic: str, parts: list[int], timeout: float = 10.0
) -> dict[int, tuple[int, int]]:
    """(low, high) per partition. With isolation.level=read_committed, high is the last stable
    offset, so a range never waits on an open transaction."""
    topic = kafka_topic(topic)
    out = {}
    for p in parts:
        try:
            marks = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        except KafkaException as exc:
            raise _unavailable(f"watermarks of {topic}[{p}]", exc) from exc
        if marks is None:
            raise KafkaUnavailableError(KafkaError(KafkaError._TIMED_OUT, f"{topic}[{p}]"))
        out[p] = (int(marks[0]), int(marks[1]))
    return out


def log_start_offset(consumer: Consumer, topic: str, partition: int, timeout: float = 10.0) -> int:
    """The oldest offset the partition's log still holds, asked of the broker now: retention and
    DeleteRecords move it forward, deleting every record below it."""
    return watermarks(consumer, topic, [partition], timeout)[partition][0]


def committed(
    consumer: Consumer, topic: str, parts: list[int], timeout: float = 10.0
) -> dict[int, int | None]:
    return {p: offset for p, (offset, _) in committed_by(consumer, topic, parts, timeout).items()}


def committed_by(
    consumer: Consumer, topic: str, parts: list[int], timeout: float = 10.0
) -> dict[int, tuple[int | None, str | None]]:
    """Per partition, the committed offset and the topic id it was committed for (its commit
    metadata; None when committed without one, as by other tools)."""
    topic = kafka_topic(topic)
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=timeout)
    except KafkaException as exc:
        raise _unavailable(f"committed offsets of {topic}", exc) from exc
    return {
        tp.partition: (tp.offset if tp.offset >= 0 else None, tp.metadata or None) for tp in tps
    }


def commit(
    consumer: Consumer, topic: str, offsets: dict[int, int], topic_id: str | None = None
) -> None:
    """Commit `offsets`; with `topic_id`, tagged with it, so that a commit made for one
    incarnation of the topic is told apart once another has replaced it."""
    if not offsets:
        return
    topic = kafka_topic(topic)
    tag = {} if topic_id is None else {"metadata": topic_id}
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, p, o, **tag) for p, o in offsets.items()],
            asynchronous=False,
        )
    except KafkaException as exc:
        raise _unavailable(f"commit offsets of {topic}", exc) from exc


def read_span(
    consumer: Consumer,
    topic: str,
    partition: int,
    start: int,
    end: int,
    *,
    batch_size: int = 2000,
    idle_timeout: float = 60.0,
) -> Iterator[list[Message]]:
    """Yield the records of [start, end) in batches, in offset order.

    Offsets missing inside the span (transaction markers, compacted records) are tolerated: the
    span is done when a record at or past `end - 1` arrives or the log end is reached at or past
    `end`. An offset no longer in the log (retention) raises OffsetsLostError instead of silently
    skipping, because auto.offset.reset is 'error'.

    A span read to its end leaves the consumer assigned: the next span of the partition usually
    starts where this one ended, and librdkafka has fetched it ahead. A span left early, or by
    an error, unassigns, so the next one starts from a clean slate. `topic` is the range's
    stream: what was fetched ahead for one stream is never taken for another's.
    """
    stream, topic = topic, kafka_topic(topic)
    _position_at(consumer, stream, partition, start)
    last_progress = time.monotonic()
    next_offset = start
    finished = False
    try:
        while True:
            # ask only for what the span still needs: librdkafka's batch consume otherwise
            # waits out the timeout for records past the span's end
            wanted = max(1, min(batch_size, end - next_offset))
            messages = consumer.consume(num_messages=wanted, timeout=0.5)
            out: list[Message] = []
            done = False
            for msg in messages:
                err = msg.error()
                if err is None:
                    offset = msg.offset()
                    if offset >= end:
                        done = True
                        break
                    if offset >= start:
                        out.append(msg)
                    if offset >= end - 1:
                        done = True
                        break
                elif err.code() == KafkaError._PARTITION_EOF:
                    if msg.offset() >= end:
                        done = True
                        break
                elif err.code() in _LOST:
                    raise OffsetsLostError(err)
                elif err.fatal():
                    raise KafkaUnavailableError(err)
                # other errors are transient and retried inside librdkafka; the idle timeout
                # below turns a lasting outage into a failure
            if out:
                last_progress = time.monotonic()
                next_offset = out[-1].offset() + 1
                yield out
            if done:
                finished = True
                return
            if time.monotonic() - last_progress > idle_timeout:
                raise KafkaUnavailableError(
                    KafkaError(
                        KafkaError._TIMED_OUT,
                        f"no records from {topic}[{partition}] towards offset {end} "
                        f"for {idle_timeout:.0f}s",
                    )
                )
    finally:
        if not finished:
            consumer.unassign()


def _position_at(consumer: Consumer, stream: str, partition: int, start: int) -> None:
    """Make `start` the next offset the consumer returns for the partition, keeping the
    assignment (and what it fetched ahead) when it is already there for the same stream (a
    re-created topic can reach the same offset on another incarnation)."""
    topic = kafka_topic(stream)
    assigned = consumer.assignment()
    if (
        getattr(consumer, "positioned_stream", None) == stream
        and len(assigned) == 1
        and (assigned[0].topic, assigned[0].partition) == (topic, partition)
    ):
        (position,) = consumer.position([TopicPartition(topic, partition)])
        if position.offset == start:
            return
    consumer.assign([TopicPartition(topic, partition, start)])
    if isinstance(consumer, LandingConsumer):
        consumer.positioned_stream = stream
