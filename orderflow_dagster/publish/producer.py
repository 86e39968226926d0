"""The transactional producer of `orders.status`.

Changelog rows after the topic's position go out in changelog_seq order, in transactions of at
most `batch_size` messages; each transaction is a contiguous block, so the position read back
(`position.published_position`) is exact after any crash. `transactional.id` is stable per
deployment: a publisher starting with it aborts whatever a dead one left open and fences a live
one (a zombie), which then stops with `ProducerFencedError`.

Crash points (orderflow_dagster/faults.py): `publish_before_send` (a transaction begun, nothing
sent), `publish_mid_transaction` (half of a transaction sent), `publish_after_commit` (a
transaction committed, nothing after it).
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer

from orderflow_dagster import faults
from orderflow_dagster.ingest.errors import ProducerFencedError, from_kafka_error
from orderflow_dagster.ingest.kafka_config import producer_config
from orderflow_dagster.publish import changelog
from orderflow_dagster.publish.position import published_position

DEFAULT_BATCH_SIZE = 10_000
TRANSACTION_TIMEOUT_S = 60.0
ATTEMPTS = 6
_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


@dataclass(frozen=True)
class Published:
    messages: int
    transactions: int
    position: int  # highest changelog_seq now committed to the topic
    seconds: float


def message_value(row: tuple, published_at: str) -> bytes:
    seq, order_id, sequence_number, kind, status, previous, event_id, at, trace_id = row
    return json.dumps(
        {
            "order_id": order_id,
            "status": status,
            "previous_status": previous,
            "sequence_number": sequence_number,
            "event_id": event_id,
            "transitioned_at": at.astimezone(UTC).isoformat() if at is not None else None,
            "trace_id": trace_id,
            "published_at": published_at,
            "kind": kind,
            "changelog_seq": seq,
        },
        separators=(",", ":"),
    ).encode()


def transactional_producer(bootstrap: str, transactional_id: str) -> Producer:
    config = producer_config(bootstrap)
    config["transactional.id"] = transactional_id
    # a run holds a transaction open for one batch: far less than this
    config["transaction.timeout.ms"] = int(TRANSACTION_TIMEOUT_S * 1000)
    producer = Producer(config)
    _call(producer.init_transactions, TRANSACTION_TIMEOUT_S)
    return producer


def _typed(exc: KafkaException) -> Exception:
    error = exc.args[0]
    if error.code() in _FENCED or (error.fatal() and "fenced" in error.str().lower()):
        return ProducerFencedError(error, "another publisher took this transactional.id")
    return from_kafka_error(error, "publishing to orders.status")


def _call(fn, *args):
    try:
        return fn(*args)
    except KafkaException as exc:
        raise _typed(exc) from exc


def publish(
    conn: psycopg.Connection,
    bootstrap: str,
    topic: str,
    transactional_id: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Published:
    """Publish every changelog row above the topic's position; returns the new position.

    A failed transaction (broker restart, timeout) is retried by a new producer with the same
    transactional.id, from the position read back again: init_transactions completes or aborts
    what the old one left, so the retry neither skips nor repeats a row."""
    started = time.monotonic()
    messages = transactions = 0
    for attempt in range(ATTEMPTS):
        producer = None
        try:
            producer = transactional_producer(bootstrap, transactional_id)
            position = published_position(bootstrap, topic)
            while rows := changelog.rows_after(conn, position, batch_size):
                _send_batch(producer, topic, rows)
                position = rows[-1][0]
                messages += len(rows)
                transactions += 1
                faults.crash_point("publish_after_commit")
            return Published(messages, transactions, position, time.monotonic() - started)
        except ProducerFencedError:
            raise
        except Exception:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(min(2**attempt, 10))
        finally:
            if producer is not None:
                producer.flush(0)
    raise AssertionError("unreachable")


def _send_batch(producer: Producer, topic: str, rows: list[tuple]) -> None:
    _call(producer.begin_transaction)
    faults.crash_point("publish_before_send")
    published_at = datetime.now(UTC).isoformat()
    half = len(rows) // 2
    try:
        for index, row in enumerate(rows):
            if index == half and index:
                producer.flush(10)
                faults.crash_point("publish_mid_transaction")
            value = message_value(row, published_at)
            key = row[1].encode()
            headers = [("changelog_seq", str(row[0]).encode()), ("kind", row[3].encode())]
            while True:
                try:
                    producer.produce(topic, value=value, key=key, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.1)
                except KafkaException as exc:
                    raise _typed(exc) from exc
            producer.poll(0)
        _call(producer.commit_transaction, TRANSACTION_TIMEOUT_S)
    except ProducerFencedError:
        raise
    except Exception:
        # if this fails too, the next producer's init_transactions aborts it instead
        with suppress(KafkaException):
            producer.abort_transaction(TRANSACTION_TIMEOUT_S)
        raise
