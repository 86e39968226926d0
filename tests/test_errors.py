"""Kafka errors become typed exceptions: what an operator can wait out is told from what not."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from orderflow_dagster.ingest.errors import (
    KafkaUnavailableError,
    OffsetsLostError,
    OrderflowKafkaError,
    from_kafka_error,
)


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._WAIT_COORD,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    ],
)
def test_a_broker_that_cannot_be_reached_is_reported_as_unavailable(code):
    error = from_kafka_error(KafkaError(code), "commit failed")
    assert isinstance(error, KafkaUnavailableError)
    assert error.kafka_error.code() == code


def test_offsets_removed_by_retention_are_reported_as_lost():
    assert isinstance(
        from_kafka_error(KafkaError(KafkaError._AUTO_OFFSET_RESET), "x"), OffsetsLostError
    )


def test_any_other_kafka_error_keeps_the_base_type_and_its_message():
    error = from_kafka_error(KafkaError(KafkaError.INVALID_CONFIG), "bad config")
    assert type(error) is OrderflowKafkaError
    assert "bad config" in str(error)
