"""librdkafka configuration for every orderflow client, built in one place.

The functions here are pure: they return plain dicts for `confluent_kafka.Producer`, `Consumer`
and `AdminClient`. Site-specific properties (SASL, SSL, client.rack, ...) come from the
environment through `settings.kafka_passthrough()` and override our defaults, except the few
properties exactly-once depends on, in any of librdkafka's spellings: overriding those to an
unsafe value raises `UnsafeKafkaConfigError` rather than quietly weakening the guarantee.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


class UnsafeKafkaConfigError(ValueError):
    """An override (ORDERFLOW_KAFKA_CONFIG_*, or `extra`) of a property exactly-once depends on."""


def _text(value: object) -> str:
    return str(value).strip().lower()


def _is_false(value: ConfigValue) -> bool:
    return value is False or (value is not True and _text(value) in _FALSE)


def _is_true(value: ConfigValue) -> bool:
    return value is True or (value is not False and _text(value) in _TRUE)


def _one_of(*accepted: str) -> Callable[[ConfigValue], bool]:
    return lambda value: not isinstance(value, bool) and _text(value) in accepted


def _int_between(low: int, high: int) -> Callable[[ConfigValue], bool]:
    def accepts(value: ConfigValue) -> bool:
        if isinstance(value, bool):
            return False
        try:
            return low <= int(_text(value)) <= high
        except ValueError:
            return False

    return accepts


def _version_at_least(minimum: tuple[int, ...]) -> Callable[[ConfigValue], bool]:
    def accepts(value: ConfigValue) -> bool:
        try:
            return tuple(int(part) for part in _text(value).split(".")) >= minimum
        except ValueError:
            return False

    return accepts


def _never(_value: ConfigValue) -> bool:
    return False


@dataclass(frozen=True)
class _Guard:
    accepts: Callable[[ConfigValue], bool]
    needs: str  # what orderflow needs, for the error message
    why: str


# Spellings librdkafka takes for one setting (see its CONFIGURATION.md): aliases, and topic-level
# twins (`topic.` prefixed, or inside `default.topic.config`) that it applies to every topic.
# Names are matched in any case and with `_` for `.`: librdkafka itself rejects those variants,
# so refusing them costs nothing and no spelling slips past.
_ALIASES = {
    "auto.commit.enable": "enable.auto.commit",  # the topic-level (legacy) twin
    "request.required.acks": "acks",
    "max.in.flight": "max.in.flight.requests.per.connection",
    "message.send.max.retries": "retries",
}
TOPIC_PREFIX = "topic."
DEFAULT_TOPIC_CONFIG = "default.topic.config"

# Both clients: a downgraded protocol silently drops features. Fetch requests older than v4 have
# no isolation level (aborted transactions are read as data) and old produce requests have no
# idempotence. Only brokers older than 0.10, which orderflow cannot run on, need these.
_PROTOCOL_GUARDS = {
    "api.version.request": _Guard(
        _is_true, "=true", "without it the protocol falls back to one with no isolation level"
    ),
    "api.version.fallback.ms": _Guard(
        _int_between(0, 0), "=0", "a fallback protocol has no isolation level and no idempotence"
    ),
    "broker.version.fallback": _Guard(
        _version_at_least((0, 10)),
        " of 0.10 or later",
        "an older fallback turns protocol negotiation off",
    ),
}
# What offsets mean and what a read returns. Deliberately not guarded: check.crcs (more checks
# only), fetch sizes and timeouts (a failure is loud), the group protocol and assignors (ranges
# are assigned, never subscribed), offset.store.path and auto.commit.interval.ms (inert without
# file storage and auto-commit).
_CONSUMER_GUARDS = {
    **_PROTOCOL_GUARDS,
    # Offsets are committed by the landing itself, after Postgres commits; an auto-commit would
    # mark events consumed before they are durably landed, so a crash would lose them.
    "enable.auto.commit": _Guard(_is_false, "=false", "offsets are committed after landing"),
    # The landing stores exactly the offsets it landed; auto-store would advance on poll().
    "enable.auto.offset.store": _Guard(
        _is_false, "=false", "only offsets that landed may be stored"
    ),
    # A file store keeps commits on one machine, out of sight of the group and of verify.
    "offset.store.method": _Guard(
        _one_of("broker"), "=broker", "the group's commits must be in Kafka"
    ),
    # An offset retention deleted must fail the landing (OffsetsLostError), not skip silently
    # to another offset: the ledger would then hold a range with records missing.
    "auto.offset.reset": _Guard(
        _one_of("error"), "=error", "offsets deleted by retention must fail loudly"
    ),
    "isolation.level": _Guard(
        _one_of("read_committed"), "=read_committed", "aborted transactions must not be read"
    ),
    # A range whose last offsets hold no record (transaction markers) ends at the partition's
    # end; without the event the read waits for a record that never comes.
    "enable.partition.eof": _Guard(_is_true, "=true", "a range may end on a transaction marker"),
    # The committed offsets are the ledger's: one group, named once, by ORDERFLOW_CONSUMER_GROUP.
    "group.id": _Guard(_never, " from ORDERFLOW_CONSUMER_GROUP only", "the group has one name"),
    # Every orderflow process shares the configuration, and static membership fences all but
    # one member with a given instance id.
    "group.instance.id": _Guard(
        _never, " unset", "every orderflow process would share one static member id"
    ),
    # A deleted topic must stay missing (a loud error), not come back empty under the old name.
    "allow.auto.create.topics": _Guard(
        _is_false, "=false", "a deleted topic must not be re-created by reading it"
    ),
}
_PRODUCER_GUARDS = {
    **_PROTOCOL_GUARDS,
    # Without idempotence a retried produce can write the same message twice or reorder a key.
    "enable.idempotence": _Guard(_is_true, "=true", "retries must not duplicate or reorder"),
    "acks": _Guard(_one_of("all", "-1"), "=all", "idempotence needs every in-sync replica"),
    "max.in.flight.requests.per.connection": _Guard(
        _int_between(1, 5), " between 1 and 5", "more requests in flight can reorder a key"
    ),
    "retries": _Guard(
        _int_between(1, 2**31 - 1), " of at least 1", "idempotence retries what failed"
    ),
    "queuing.strategy": _Guard(_one_of("fifo"), "=fifo", "lifo reorders each key's messages"),
}


def canonical_name(name: str) -> str:
    """The librdkafka property that `name` sets, as orderflow's guards name it."""
    key = name.strip().lower().replace("_", ".")
    while key.startswith(TOPIC_PREFIX):
        key = key[len(TOPIC_PREFIX) :]
    return _ALIASES.get(key, key)


ENVIRONMENT = "the environment"


def _refuse(name: str, value: object, canonical: str, guard: _Guard, source: str) -> None:
    spelled = "" if name == canonical else f" (that is {canonical})"
    if source == ENVIRONMENT:
        variable = settings.KAFKA_PASSTHROUGH_PREFIX + name.upper().replace(".", "_")
        source = f"{variable} in {ENVIRONMENT}"
    raise UnsafeKafkaConfigError(
        f"refusing Kafka override {name}={value!r}{spelled} from {source}: orderflow needs "
        f"{canonical}{guard.needs} because {guard.why}"
    )


def _checked(
    passthrough: Mapping[str, Any], guards: Mapping[str, _Guard], source: str, pinned: set[str]
) -> dict[str, Any]:
    """`passthrough` with every guarded property refused unless its value is safe, and the safe
    restatements of `pinned` ones dropped (the caller sets those itself)."""
    out: dict[str, Any] = {}
    for name, value in passthrough.items():
        canonical = canonical_name(name)
        if canonical == DEFAULT_TOPIC_CONFIG:
            if not isinstance(value, Mapping):
                raise UnsafeKafkaConfigError(
                    f"refusing Kafka override {name}={value!r} from {source}: give topic "
                    "properties at the top level instead"
                )
            nested = _checked(value, guards, f"{name} in {source}", pinned)
            if nested:
                out[name] = nested
            continue
        guard = guards.get(canonical)
        if guard is not None and not guard.accepts(value):
            _refuse(name, value, canonical, guard, source)
        if canonical not in pinned:
            out[name] = value
    return out


def _merge(
    defaults: KafkaConfig,
    extra: Mapping[str, Any] | None,
    guards: Mapping[str, _Guard],
    explicit: KafkaConfig,
) -> KafkaConfig:
    """defaults < passthrough < explicit arguments, with guarded properties refused or pinned."""
    if extra is None:
        passthrough, source = settings.kafka_passthrough(), ENVIRONMENT
    else:
        passthrough, source = dict(extra), "the extra argument"
    # a guarded property orderflow sets keeps orderflow's value, whatever equivalent spelling
    # ("TRUE", "0", an alias) restated it
    pinned = {name for name in guards if name in defaults}
    checked = _checked(passthrough, guards, source, pinned)
    return {**defaults, **checked, **explicit}


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
