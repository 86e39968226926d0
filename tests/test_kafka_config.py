"""librdkafka config builders: safe defaults, passthrough, and refusing unsafe overrides in
every spelling librdkafka takes."""

from __future__ import annotations

import os
import re
from unittest import mock

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from hypothesis import assume, given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from orderflow_dagster import settings
from orderflow_dagster.ingest.kafka_config import (
    UnsafeKafkaConfigError,
    admin_config,
    canonical_name,
    consumer_config,
    default_partition,
    producer_config,
)

BOOTSTRAP = "127.0.0.1:1"


def test_producer_is_idempotent_with_acks_all_and_lz4() -> None:
    config = producer_config(BOOTSTRAP, extra={})
    assert config["bootstrap.servers"] == BOOTSTRAP
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger.ms"] == 5
    assert config["compression.type"] == "lz4"
    assert config["partitioner"] == "murmur2_random"


def test_consumer_commits_explicitly_and_reads_committed_only() -> None:
    config = consumer_config(BOOTSTRAP, "orderflow", extra={})
    assert config["group.id"] == "orderflow"
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["isolation.level"] == "read_committed"
    assert config["auto.offset.reset"] == "error"
    assert config["enable.partition.eof"] is True
    assert config["fetch.queue.backoff.ms"] == 10
    assert config["queued.max.messages.kbytes"] < 65536  # below librdkafka's 64 MiB default


def test_admin_config_has_only_bootstrap_and_passthrough() -> None:
    assert admin_config(BOOTSTRAP, extra={}) == {"bootstrap.servers": BOOTSTRAP}
    assert admin_config(BOOTSTRAP, extra={"security.protocol": "SSL"})["security.protocol"] == "SSL"


def test_the_installed_client_accepts_every_config() -> None:
    # Catches typos and unsupported values (e.g. lz4 missing from the librdkafka build).
    Producer(producer_config(BOOTSTRAP, extra={}))
    Consumer(consumer_config(BOOTSTRAP, "g", extra={})).close()
    AdminClient(admin_config(BOOTSTRAP, extra={}))


def test_passthrough_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERFLOW_KAFKA_CONFIG_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ORDERFLOW_KAFKA_CONFIG_SASL_MECHANISMS", "PLAIN")
    for config in (
        producer_config(BOOTSTRAP),
        consumer_config(BOOTSTRAP, "g"),
        admin_config(BOOTSTRAP),
    ):
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanisms"] == "PLAIN"


def test_passthrough_overrides_ordinary_defaults() -> None:
    producer = producer_config(BOOTSTRAP, extra={"linger.ms": "50", "compression.type": "zstd"})
    consumer = consumer_config(BOOTSTRAP, "g", extra={"fetch.queue.backoff.ms": "100"})
    assert (producer["linger.ms"], producer["compression.type"]) == ("50", "zstd")
    assert consumer["fetch.queue.backoff.ms"] == "100"


def test_explicit_arguments_win_over_passthrough() -> None:
    config = consumer_config(BOOTSTRAP, "mine", extra={"bootstrap.servers": "y"})
    assert (config["bootstrap.servers"], config["group.id"]) == (BOOTSTRAP, "mine")


# What exactly-once depends on, as this test states it (independently of the module's tables):
# property -> (every spelling librdkafka takes for it, values that weaken the guarantee, values
# that restate what orderflow needs)
CONSUMER_GUARDED = {
    "enable.auto.commit": (
        ["enable.auto.commit", "auto.commit.enable"],
        ["true", "t", "1", True, 1],
        ["false", "F", "0", False, 0],
    ),
    "enable.auto.offset.store": (["enable.auto.offset.store"], ["true", True, "1"], ["false"]),
    "auto.offset.reset": (
        ["auto.offset.reset"],
        ["earliest", "smallest", "beginning", "latest", "largest", "end", "none", ""],
        ["error", "ERROR"],
    ),
    "isolation.level": (
        ["isolation.level"],
        ["read_uncommitted", "garbage"],
        ["read_committed", "READ_COMMITTED"],
    ),
    "enable.partition.eof": (["enable.partition.eof"], ["false", "0", False], ["true", True]),
    "offset.store.method": (["offset.store.method"], ["file", "none"], ["broker"]),
    "group.id": (["group.id"], ["other", "g", ""], []),
    "group.instance.id": (["group.instance.id"], ["pod-1", ""], []),
    "allow.auto.create.topics": (["allow.auto.create.topics"], ["true", True], ["false"]),
    "api.version.request": (["api.version.request"], ["false", False], ["true"]),
    "api.version.fallback.ms": (["api.version.fallback.ms"], ["1", 600000], ["0", 0]),
    "broker.version.fallback": (
        ["broker.version.fallback"],
        ["0.9.0", "0.8.2", "nonsense"],
        ["0.10.0", "2.8.1"],
    ),
}
PRODUCER_GUARDED = {
    "enable.idempotence": (["enable.idempotence"], ["false", "0", False], ["true", True]),
    "acks": (["acks", "request.required.acks"], ["1", "0", 1, 0, "leader"], ["all", "-1", -1]),
    "max.in.flight.requests.per.connection": (
        ["max.in.flight.requests.per.connection", "max.in.flight"],
        ["6", 1000000, "0", "many"],
        ["1", 5],
    ),
    "retries": (["retries", "message.send.max.retries"], ["0", 0, "-1"], ["3", 2147483647]),
    "queuing.strategy": (["queuing.strategy"], ["lifo"], ["fifo", "FIFO"]),
    "api.version.request": (["api.version.request"], ["false"], ["true"]),
}


@st.composite
def spelling(draw: st.DrawFn, names: list[str]) -> str:
    """A name librdkafka (or the environment passthrough) may see for one of `names`: any case,
    `_` for any `.`, with or without the `topic.` prefix of topic-level properties."""
    name = draw(st.sampled_from(names))
    if draw(st.booleans()):
        name = "topic." + name
    name = "".join(draw(st.sampled_from(["_", "."])) if c == "." else c for c in name)
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


@st.composite
def spelled_value(draw: st.DrawFn, values: list[object]) -> object:
    value = draw(st.sampled_from(values))
    if isinstance(value, str):
        value = "".join(c.upper() if draw(st.booleans()) else c for c in value)
        value = draw(st.sampled_from(["", " "])) + value + draw(st.sampled_from(["", " "]))
    return value


def _override(draw: st.DrawFn, guarded: dict, which: int) -> tuple[str, str, object]:
    canonical = draw(st.sampled_from(sorted(guarded)))
    names, unsafe, safe = guarded[canonical]
    values = (unsafe, safe)[which]
    assume(values)
    return canonical, draw(spelling(names)), draw(spelled_value(values))


@st.composite
def unsafe_override(draw: st.DrawFn, guarded: dict) -> tuple[str, str, object]:
    return _override(draw, guarded, 0)


@st.composite
def safe_override(draw: st.DrawFn, guarded: dict) -> tuple[str, str, object]:
    return _override(draw, guarded, 1)


def _delivered(how: str, name: str, value: object) -> dict[str, object] | None:
    """`extra` for the config builders, or None after putting the override in the environment
    (where only text exists, as ORDERFLOW_KAFKA_CONFIG_<NAME>)."""
    if how == "nested":
        return {"default.topic.config": {name: value}}
    if how == "env":
        env_name = settings.KAFKA_PASSTHROUGH_PREFIX + name.replace(".", "_")
        os.environ[env_name] = str(value).lower() if isinstance(value, bool) else str(value)
        return None
    return {name: value}


@pytest.mark.parametrize(
    ("guarded", "build"),
    [
        (CONSUMER_GUARDED, lambda extra: consumer_config(BOOTSTRAP, "g", extra=extra)),
        (PRODUCER_GUARDED, lambda extra: producer_config(BOOTSTRAP, extra=extra)),
    ],
    ids=["consumer", "producer"],
)
@given(data=st.data(), how=st.sampled_from(["top", "nested", "env"]))
@settings_(max_examples=300)
def test_every_spelling_of_an_unsafe_override_is_refused(guarded, build, data, how) -> None:
    canonical, name, value = data.draw(unsafe_override(guarded))
    with mock.patch.dict(os.environ, clear=False):
        extra = _delivered(how, name, value)
        with pytest.raises(UnsafeKafkaConfigError, match=re.escape(canonical)):
            build(extra)


@given(overrides=st.lists(safe_override(CONSUMER_GUARDED), max_size=6))
@settings_(max_examples=100)
def test_restating_safe_consumer_values_in_any_spelling_keeps_the_canonical_ones(overrides):
    config = consumer_config(BOOTSTRAP, "g", extra={name: value for _, name, value in overrides})
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["auto.offset.reset"] == "error"
    assert config["isolation.level"] == "read_committed"
    assert config["enable.partition.eof"] is True
    assert config["group.id"] == "g"
    # no second spelling of a pinned property is left for librdkafka to apply after ours
    pinned = {"enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset"}
    pinned |= {"isolation.level", "enable.partition.eof"}
    assert [k for k in config if canonical_name(k) in pinned] == [k for k in config if k in pinned]


@given(overrides=st.lists(safe_override(PRODUCER_GUARDED), max_size=4))
@settings_(max_examples=100)
def test_restating_safe_producer_values_in_any_spelling_is_allowed(overrides):
    config = producer_config(BOOTSTRAP, extra={name: value for _, name, value in overrides})
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"


# properties that change neither what offsets mean nor what a read returns
UNGUARDED = [
    "security.protocol",
    "sasl.mechanisms",
    "client.id",
    "client.rack",
    "check.crcs",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "session.timeout.ms",
    "auto.commit.interval.ms",
    "enable.gapless.guarantee",
    "linger.ms",
]


@given(
    name=st.sampled_from(UNGUARDED),
    value=st.one_of(st.text(max_size=20), st.integers(), st.booleans()),
)
def test_properties_outside_the_guarantee_pass_through_unchanged(name, value) -> None:
    assert consumer_config(BOOTSTRAP, "g", extra={name: value})[name] == value
    assert producer_config(BOOTSTRAP, extra={name: value})[name] == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("topic.auto.offset.reset", "earliest"),
        ("auto.offset.reset", "SMALLEST"),
        ("auto.commit.enable", "true"),
        ("topic.enable.auto.commit", "true"),
        ("topic.offset.store.method", "file"),
        ("isolation.level", "READ_UNCOMMITTED"),
        ("enable.partition.eof", "F"),
        ("group.instance.id", "pod-1"),
        ("allow.auto.create.topics", "true"),
        ("api.version.request", "false"),
        ("broker.version.fallback", "0.9.0"),
    ],
)
def test_each_refused_consumer_spelling_is_one_the_installed_client_would_apply(name, value):
    # the guard is not moot: librdkafka takes this spelling as it stands
    Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "g", name: value}).close()
    with pytest.raises(UnsafeKafkaConfigError):
        consumer_config(BOOTSTRAP, "g", extra={name: value})


def test_a_default_topic_config_that_is_not_a_mapping_is_refused_clearly() -> None:
    with pytest.raises(UnsafeKafkaConfigError, match="top level"):
        consumer_config(BOOTSTRAP, "g", extra={"default.topic.config": "auto.offset.reset=x"})


def test_the_refusal_names_the_environment_variable_to_remove(monkeypatch) -> None:
    monkeypatch.setenv("ORDERFLOW_KAFKA_CONFIG_AUTO_OFFSET_RESET", "earliest")
    with pytest.raises(UnsafeKafkaConfigError) as refused:
        consumer_config(BOOTSTRAP, "g")
    assert "ORDERFLOW_KAFKA_CONFIG_AUTO_OFFSET_RESET" in str(refused.value)
    assert "auto.offset.reset=error" in str(refused.value)


def test_default_partition_matches_the_java_partitioner() -> None:
    # Reference values from Kafka's Java client (Utils.murmur2, toPositive, % partitions).
    assert default_partition(b"21", 4) == (-973932308 & 0x7FFFFFFF) % 4
    assert default_partition(b"foobar", 8) == (-790332482 & 0x7FFFFFFF) % 8
    assert default_partition(b"a-little-bit-long-string", 16) == (-985981536 & 0x7FFFFFFF) % 16
    with pytest.raises(ValueError):
        default_partition(b"k", 0)
