"""librdkafka configuration for every orderflow client, built in one place.

The functions here are pure: they return plain dicts for `confluent_kafka.Producer`, `Consumer`
and `AdminClient`. Site-specific properties (SASL, SSL, client.rack, ...) come from the
environment through `settings.kafka_passthrough()` and override our defaults, except the few
properties exactly-once depends on: overriding those to an unsafe value raises `ValueError`
rather than quietly weakening the guarantee.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from orderflow_dagster import settings

ConfigValue = str | int | float | bool
KafkaConfig = dict[str, ConfigValue]

# Java's default partitioner. librdkafka defaults to CRC32 (consistent_random), which would send
# the same key to a different partition than a JVM producer writing to the same topic, breaking
# the per-aggregate ordering the whole pipeline relies on.
PARTITIONER = "murmur2_random"

# Bounded consumer memory: librdkafka prefetches up to this many KiB into the single high-level
# consumer queue (default 64 MiB). 16 MiB is ~50k order events, far more than one batch needs.
CONSUMER_QUEUE_KBYTES = 16 * 1024

_TRUE = frozenset({"true", "t", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "n", "off"})


def _is_false(value: ConfigValue) -> bool:
    return value is False or str(value).strip().lower() in _FALSE


def _is_true(value: ConfigValue) -> bool:
    return value is True or str(value).strip().lower() in _TRUE


def _is_read_committed(value: ConfigValue) -> bool:
    return str(value).strip().lower() == "read_committed"


# property -> (accepts the value?, why it must not change). Each is guarded per client kind.
_CONSUMER_GUARDS: dict[str, tuple[Callable[[ConfigValue], bool], str]] = {
    # Offsets are committed by the landing transaction itself (exactly-once); an auto-commit
    # would mark events consumed before they are durably landed, so a crash would lose them.
    "enable.auto.commit": (_is_false, "offsets are committed together with the landed rows"),
    # read_uncommitted would land events from aborted transactions, which never happened.
    "isolation.level": (_is_read_committed, "events from aborted transactions must not be read"),
}
_PRODUCER_GUARDS: dict[str, tuple[Callable[[ConfigValue], bool], str]] = {
    # Without idempotence a retried produce can write the same message twice or reorder a key.
    "enable.idempotence": (_is_true, "retries must not duplicate or reorder messages"),
}


def _merge(
    defaults: KafkaConfig,
    extra: Mapping[str, Any] | None,
    guards: Mapping[str, tuple[Callable[[ConfigValue], bool], str]],
    explicit: KafkaConfig,
) -> KafkaConfig:
    """defaults < passthrough < explicit arguments, with guarded properties pinned."""
    passthrough = settings.kafka_passthrough() if extra is None else dict(extra)
    for name, (acceptable, why) in guards.items():
        if name in passthrough and not acceptable(passthrough[name]):
            raise ValueError(
                f"refusing Kafka override {name}={passthrough[name]!r}: orderflow needs "
                f"{name}={defaults[name]!r} because {why}"
            )
    merged: KafkaConfig = {**defaults, **passthrough, **explicit}
    # Keep our canonical value even when the override was an equivalent spelling ("TRUE", "0").
    for name in guards:
        merged[name] = defaults[name]
    return merged


def producer_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> KafkaConfig:
    """Config for an idempotent producer; `extra` defaults to the environment passthrough."""
    defaults: KafkaConfig = {
        "enable.idempotence": True,
        # Idempotence requires acks=all; spelled out so nobody "tunes" it to 1.
        "acks": "all",
        # A few ms of batching buys large throughput gains at negligible latency.
        "linger.ms": 5,
        "compression.type": "lz4",
        "partitioner": PARTITIONER,
    }
    return _merge(defaults, extra, _PRODUCER_GUARDS, {"bootstrap.servers": bootstrap})


def consumer_config(
    bootstrap: str, group_id: str, extra: Mapping[str, Any] | None = None
) -> KafkaConfig:
    """Config for a consumer whose offsets the caller stores and commits explicitly."""
    defaults: KafkaConfig = {
        "enable.auto.commit": False,
        # The caller stores exactly the offsets it has landed; auto-store would advance on poll().
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        # If a committed or requested offset was deleted by retention, fail loudly
        # (OffsetsLostError) instead of silently skipping to the earliest/latest message.
        "auto.offset.reset": "error",
        # Tells a bounded catch-up read that it reached the end of a partition.
        "enable.partition.eof": True,
        # librdkafka's default of 1000 ms makes the consumer idle a full second whenever
        # processing is slower than fetching and the queue briefly fills up.
        "fetch.queue.backoff.ms": 10,
        # A landing consumer assigns afresh for every range that does not continue the last one
        # (and a new run has a new consumer); a fetch parked at the log end for the default
        # 500 ms would delay every such range near the head of the log by that much.
        "fetch.wait.max.ms": 10,
        "queued.max.messages.kbytes": CONSUMER_QUEUE_KBYTES,
    }
    return _merge(
        defaults,
        extra,
        _CONSUMER_GUARDS,
        {"bootstrap.servers": bootstrap, "group.id": group_id},
    )


def admin_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> KafkaConfig:
    """Config for an AdminClient (metadata, topic creation, watermarks)."""
    return _merge({}, extra, {}, {"bootstrap.servers": bootstrap})


def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's and librdkafka's), as an unsigned 32-bit int."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    body = len(data) - len(data) % 4
    for i in range(0, body, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[body:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def default_partition(key: bytes, num_partitions: int) -> int:
    """The partition our producers (PARTITIONER) choose for a non-empty `key`."""
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    return (_murmur2(key) & 0x7FFFFFFF) % num_partitions
