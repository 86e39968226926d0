"""Producing order events: an idempotent producer that never loses a failure quietly.

librdkafka delivers asynchronously; a produce() that returns has only been queued. Delivery
reports arrive later through callbacks, and a callback that merely logs turns lost events into a
log line nobody reads. `EventProducer` records every failed report and `flush()` raises
`DeliveryError` for them, so a run that lost data fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from confluent_kafka import KafkaError, Message, Producer
from opentelemetry.trace import SpanKind

from orderflow_dagster import settings
from orderflow_dagster.ingest.envelope import Event, encode, new_event
from orderflow_dagster.ingest.errors import DeliveryError, FailedDelivery, OrderflowKafkaError
from orderflow_dagster.ingest.kafka_config import producer_config
from orderflow_dagster.tracing import tracer, with_trace_context

log = logging.getLogger(__name__)

Headers = Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]]

DEFAULT_FLUSH_TIMEOUT_S = 60.0
# How long one poll() waits for delivery reports to free queue space when the queue is full.
_QUEUE_FULL_POLL_S = 0.1


class EventProducer:
    """An idempotent producer for the orders topic. Use as a context manager: leaving the block
    normally flushes and raises `DeliveryError` if anything was not delivered."""

    def __init__(
        self,
        bootstrap: str | None = None,
        *,
        topic: str | None = None,
        extra: Mapping[str, Any] | None = None,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S,
    ) -> None:
        bootstrap = bootstrap or settings.require("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS")
        self.topic = topic or settings.topic()
        self.flush_timeout = flush_timeout
        self.delivered = 0
        self._failures: list[FailedDelivery] = []
        self._fatal: KafkaError | None = None
        config: dict[str, Any] = dict(producer_config(bootstrap, extra))
        config["error_cb"] = self._on_error
        self._producer = Producer(config)

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
                return
            # The body already failed: still try to deliver what was queued, but let the
            # original exception propagate; a delivery problem on top of it is logged, not
            # swallowed silently.
            try:
                self.flush()
            except OrderflowKafkaError as flush_error:
                log.error(
                    "while handling %r, flushing the producer also failed: %s", exc, flush_error
                )
        finally:
            self.close()

    def close(self) -> None:
        """Release the client now. The error callback refers back to this object, so without
        this the librdkafka client (and its threads) would live until a garbage collection."""
        self._producer = None

    # -- producing -------------------------------------------------------------------------------

    def emit(
        self,
        event: Event,
        *,
        topic: str | None = None,
        partition: int | None = None,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> str:
        """Queue one envelope; returns its event_id. Delivery is confirmed only by `flush()`.

        The current trace context, if any, travels in a `traceparent` header."""
        event_key, value = encode(event)
        with tracer.start_as_current_span(
            "orderflow.produce",
            kind=SpanKind.PRODUCER,
            attributes={
                "orderflow.event_id": str(event["event_id"]),
                "orderflow.event_type": str(event["event_type"]),
            },
        ):
            headers = with_trace_context(headers)
            self.produce_raw(
                value, event_key if key is None else key, partition, headers, topic=topic
            )
        return str(event["event_id"])

    def produce_raw(
        self,
        value_bytes: bytes,
        key_bytes: bytes | None,
        partition: int | None = None,
        headers: Headers | None = None,
        *,
        topic: str | None = None,
    ) -> None:
        """Queue arbitrary bytes (poison messages, replays of already-encoded events)."""
        kwargs: dict[str, Any] = {
            "value": value_bytes,
            "key": key_bytes,
            "on_delivery": self._on_delivery,
        }
        if partition is not None:
            kwargs["partition"] = partition
        if headers is not None:
            kwargs["headers"] = headers
        # No Kafka timestamp from the event: broker retention is time-based on the message
        # timestamp, and replayed or demo events with old event times would be deleted at once.
        self._produce(topic or self.topic, kwargs)

    def _produce(self, topic: str, kwargs: dict[str, Any]) -> None:
        if self._producer is None:
            raise RuntimeError("this EventProducer is closed")
        while True:
            self._raise_if_fatal()
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then retry. It always
                # drains eventually because undeliverable messages time out (message.timeout.ms).
                self._producer.poll(_QUEUE_FULL_POLL_S)
        # Serve callbacks as we go so failures surface early and reports do not pile up.
        self._producer.poll(0)

    def poll(self, timeout: float = 0.0) -> int:
        """Serve pending delivery reports; returns how many were served."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued message; raise `DeliveryError` if any failed or remain queued.

        Failures are sticky: once a delivery failed, every later flush raises too, because the
        stream this producer wrote is incomplete."""
        remaining = self._producer.flush(self.flush_timeout if timeout is None else timeout)
        self._raise_if_fatal()
        if self._failures:
            first = self._failures[0]
            raise DeliveryError(
                first.error,
                f"{len(self._failures)} message(s) failed delivery, first to "
                f"{first.topic}[{first.partition}]",
                self._failures,
            )
        if remaining > 0:
            raise DeliveryError(
                KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} message(s) still queued"),
                f"flush timed out with {remaining} message(s) not yet delivered",
            )

    @property
    def failures(self) -> tuple[FailedDelivery, ...]:
        return tuple(self._failures)

    def __len__(self) -> int:
        """Messages queued or in flight, not yet reported."""
        return len(self._producer)

    # -- callbacks (run inside poll/flush on this thread) ----------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self._failures.append(FailedDelivery(err, msg.topic(), msg.partition(), msg.key()))

    def _on_error(self, err: KafkaError) -> None:
        # Non-fatal errors (a broker briefly down) are retried by librdkafka and end up as
        # delivery failures if they persist; a fatal one (idempotence state lost) stops everything.
        if err.fatal():
            self._fatal = self._fatal or err
        else:
            log.warning("kafka producer: %s", err)

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise DeliveryError(self._fatal, "the idempotent producer hit a fatal error")


def emit_event(
    aggregate_id: str,
    event_type: str,
    payload: dict[str, Any],
    *,
    event_id: str | None = None,
    timestamp_ms: int | None = None,
    schema_version: int = 1,
    trace_id: str | None = None,
    topic: str | None = None,
    producer: EventProducer | None = None,
    flush_timeout: float | None = None,
) -> str:
    """Send one event and wait for its delivery; returns the event_id.

    A fresh UUIDv7 unless `event_id` is given: to retry after an error, pass the id the first
    attempt returned (or chose) so the duplicate is recognised downstream. With `producer`, that
    producer is used (and flushed); otherwise a short-lived one is created.
    """
    event = new_event(
        aggregate_id,
        event_type,
        payload,
        event_id=event_id,
        timestamp_ms=timestamp_ms,
        schema_version=schema_version,
        trace_id=trace_id,
    )
    if producer is not None:
        producer.emit(event, topic=topic)
        producer.flush(flush_timeout)
        return str(event["event_id"])
    own = EventProducer(topic=topic)
    own.emit(event)
    own.flush(flush_timeout)
    return str(event["event_id"])


def produce_raw(
    value_bytes: bytes,
    key_bytes: bytes | None,
    partition: int | None = None,
    headers: Headers | None = None,
    *,
    topic: str | None = None,
) -> None:
    """Send arbitrary bytes once and wait for delivery (for poison messages in tests)."""
    own = EventProducer(topic=topic)
    own.produce_raw(value_bytes, key_bytes, partition, headers)
    own.flush()
