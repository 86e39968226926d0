"""librdkafka config builders: safe defaults, passthrough, and refusing unsafe overrides."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from orderflow_dagster.ingest.kafka_config import (
    admin_config,
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
    config = consumer_config(BOOTSTRAP, "mine", extra={"group.id": "x", "bootstrap.servers": "y"})
    assert (config["bootstrap.servers"], config["group.id"]) == (BOOTSTRAP, "mine")


@pytest.mark.parametrize("value", ["true", "True", "1", True])
def test_consumer_refuses_auto_commit(value: object) -> None:
    with pytest.raises(ValueError, match=r"enable\.auto\.commit"):
        consumer_config(BOOTSTRAP, "g", extra={"enable.auto.commit": value})


@pytest.mark.parametrize("value", ["read_uncommitted", "garbage"])
def test_consumer_refuses_read_uncommitted(value: str) -> None:
    with pytest.raises(ValueError, match=r"isolation\.level"):
        consumer_config(BOOTSTRAP, "g", extra={"isolation.level": value})


@pytest.mark.parametrize("value", ["false", "0", False])
def test_producer_refuses_disabling_idempotence(value: object) -> None:
    with pytest.raises(ValueError, match=r"enable\.idempotence"):
        producer_config(BOOTSTRAP, extra={"enable.idempotence": value})


def test_restating_a_safe_value_is_allowed_and_kept_canonical() -> None:
    consumer = consumer_config(
        BOOTSTRAP, "g", extra={"enable.auto.commit": "FALSE", "isolation.level": "read_committed"}
    )
    producer = producer_config(BOOTSTRAP, extra={"enable.idempotence": "true"})
    assert consumer["enable.auto.commit"] is False
    assert consumer["isolation.level"] == "read_committed"
    assert producer["enable.idempotence"] is True


def test_default_partition_matches_the_java_partitioner() -> None:
    # Reference values from Kafka's Java client (Utils.murmur2, toPositive, % partitions).
    assert default_partition(b"21", 4) == (-973932308 & 0x7FFFFFFF) % 4
    assert default_partition(b"foobar", 8) == (-790332482 & 0x7FFFFFFF) % 8
    assert default_partition(b"a-little-bit-long-string", 16) == (-985981536 & 0x7FFFFFFF) % 16
    with pytest.raises(ValueError):
        default_partition(b"k", 0)
