"""Typed Kafka failures, so callers can tell "retry later" from "stop and look".

librdkafka reports everything as a `KafkaError` with a numeric code; the code that decides what
to do (retry the Dagster run, fail it loudly, alert) should not have to know those codes. Every
exception here keeps the original error (`.kafka_error`, `.code`, `.retriable`) for logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError

# Client-side (negative) and broker codes that mean "the cluster is not reachable right now".
_UNAVAILABLE_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._RESOLVE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_COORDINATOR,
        KafkaError._WAIT_COORD,  # e.g. a commit while the broker holding the group is down
    }
)
# With auto.offset.reset=error the consumer reports _AUTO_OFFSET_RESET instead of silently jumping
# to another offset; OFFSET_OUT_OF_RANGE is the broker's own answer for the same situation.
_OFFSETS_LOST_CODES = frozenset({KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE})


class OrderflowKafkaError(Exception):
    """Base class: a Kafka operation failed; wraps the librdkafka `KafkaError`."""

    def __init__(self, kafka_error: KafkaError, message: str | None = None) -> None:
        self.kafka_error = kafka_error
        self.code: int = kafka_error.code()
        self.retriable: bool = bool(kafka_error.retriable())
        detail = f"{kafka_error.name()}: {kafka_error.str()}"
        super().__init__(f"{message} ({detail})" if message else detail)


@dataclass(frozen=True, slots=True)
class FailedDelivery:
    """One message the producer could not deliver."""

    error: KafkaError
    topic: str | None
    partition: int | None
    key: bytes | None


class DeliveryError(OrderflowKafkaError):
    """Raised by `EventProducer.flush` when a produced message was not acknowledged by the broker
    (its delivery report carried an error, or it was still queued when the flush timed out).

    `.failures` lists every failed delivery seen, `.kafka_error` is the first one.
    """

    def __init__(
        self,
        kafka_error: KafkaError,
        message: str | None = None,
        failures: Sequence[FailedDelivery] = (),
    ) -> None:
        super().__init__(kafka_error, message)
        self.failures: tuple[FailedDelivery, ...] = tuple(failures)


class KafkaUnavailableError(OrderflowKafkaError):
    """Raised when the cluster cannot be reached or does not answer in time. Transient: retrying
    the whole operation later is the right response."""


class OffsetsLostError(OrderflowKafkaError):
    """Raised when the offsets to read are no longer in the log (deleted by retention, or the
    topic was recreated). Not transient: events were lost for this consumer and a human must
    decide how to recover; retrying would only fail again or, worse, skip data silently."""


def from_kafka_error(kafka_error: KafkaError, message: str | None = None) -> OrderflowKafkaError:
    """The most specific exception for a non-delivery `KafkaError` (consumer, admin, metadata)."""
    code = kafka_error.code()
    if code in _OFFSETS_LOST_CODES:
        return OffsetsLostError(kafka_error, message)
    if code in _UNAVAILABLE_CODES:
        return KafkaUnavailableError(kafka_error, message)
    return OrderflowKafkaError(kafka_error, message)


class ProducerFencedError(OrderflowKafkaError):
    """Raised when a newer producer with the same `transactional.id` fenced this one (a zombie).
    Not transient: the newer producer publishes; retrying here would fence it back in turn."""
