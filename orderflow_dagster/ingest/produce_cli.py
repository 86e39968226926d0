"""`orderflow produce`: send a generated demo or benchmark stream to the orders topic.

The stream comes from `generator.generate` (deterministic per seed), so a run can be reproduced
and checked: `--manifest` writes one JSON line per message for an oracle.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from tqdm import tqdm

from orderflow_dagster import settings
from orderflow_dagster.ingest.errors import (
    DeliveryError,
    KafkaUnavailableError,
    OrderflowKafkaError,
    from_kafka_error,
)
from orderflow_dagster.ingest.generator import DEFAULT_START_MS, Outgoing, generate
from orderflow_dagster.ingest.kafka_config import admin_config
from orderflow_dagster.ingest.producer import EventProducer

# Updating tqdm per message would cost more than producing it.
_PROGRESS_EVERY = 1_000


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "produce",
        help="send a generated stream of order events (with duplicates and poison) to Kafka",
        description=(
            "Generate ORDERS order lifecycles, deterministically from --seed, and send them with "
            "the idempotent producer. Needs ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS and an existing "
            "topic."
        ),
    )
    parser.add_argument("--orders", type=int, default=1000, help="order lifecycles (default 1000)")
    parser.add_argument(
        "--seed", type=int, default=None, help="generator seed (default: random, printed)"
    )
    parser.add_argument("--duplicate-rate", type=_rate, default=0.05)
    parser.add_argument("--cross-partition-duplicate-share", type=_rate, default=0.5)
    parser.add_argument("--out-of-order-rate", type=_rate, default=0.1)
    parser.add_argument("--poison-rate", type=_rate, default=0.01)
    parser.add_argument("--v2-share", type=_rate, default=0.5, help="OrderCreated sent as v2")
    parser.add_argument("--start-ms", type=int, default=DEFAULT_START_MS, help="first event time")
    parser.add_argument("--topic", default=None, help="default: $ORDERFLOW_TOPIC or orders.events")
    parser.add_argument(
        "--manifest", type=Path, default=None, help="write one JSON line per message sent"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.orders < 0:
        print("orderflow produce: --orders must be >= 0", file=sys.stderr)
        return 2
    topic = args.topic or settings.topic()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    try:
        bootstrap = settings.require("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS")
        num_partitions = partition_count(bootstrap, topic)
        started = time.monotonic()
        counts = _send(args, bootstrap, topic, seed, num_partitions)
    except DeliveryError as exc:
        print(
            f"orderflow produce: delivery failed, the stream is incomplete: {exc}", file=sys.stderr
        )
        return 1
    except (OrderflowKafkaError, LookupError, RuntimeError) as exc:
        print(f"orderflow produce: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    print(
        f"produced messages={counts.total()} events={counts['event']} "
        f"duplicates={counts['duplicate']} poison={counts['poison']} orders={args.orders} "
        f"topic={topic} partitions={num_partitions} seed={seed} elapsed_s={elapsed:.1f}"
    )
    return 0


def partition_count(bootstrap: str, topic: str, timeout: float = 10.0) -> int:
    """Partitions of `topic`; `LookupError` if it does not exist (we never auto-create it: its
    partition count is a capacity decision), `KafkaUnavailableError` if Kafka does not answer."""
    admin = AdminClient(admin_config(bootstrap))
    try:
        metadata = admin.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else KafkaError(KafkaError._TRANSPORT)
        raise KafkaUnavailableError(error, f"cannot reach Kafka at {bootstrap}") from exc
    meta = metadata.topics.get(topic)
    if meta is None or meta.error is not None:
        if meta is None or meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise LookupError(f"topic {topic!r} does not exist on {bootstrap}; create it first")
        raise from_kafka_error(meta.error, f"cannot read metadata of topic {topic!r}")
    return len(meta.partitions)


def _send(
    args: argparse.Namespace, bootstrap: str, topic: str, seed: int, num_partitions: int
) -> Counter[str]:
    stream = generate(
        args.orders,
        seed=seed,
        duplicate_rate=args.duplicate_rate,
        cross_partition_duplicate_share=args.cross_partition_duplicate_share,
        out_of_order_rate=args.out_of_order_rate,
        poison_rate=args.poison_rate,
        v2_share=args.v2_share,
        start_ms=args.start_ms,
        num_partitions=num_partitions,
    )
    counts: Counter[str] = Counter()
    show_progress = not args.quiet and sys.stderr.isatty()
    with (
        _manifest(args.manifest) as manifest,
        tqdm(unit="msg", file=sys.stderr, disable=not show_progress, mininterval=0.5) as bar,
    ):
        producer = EventProducer(bootstrap, topic=topic)
        for message in stream:
            producer.produce_raw(message.value, message.key, message.partition)
            counts[message.kind] += 1
            if manifest is not None:
                manifest.write(_manifest_line(message))
            if counts.total() % _PROGRESS_EVERY == 0:
                bar.update(_PROGRESS_EVERY)
        bar.update(counts.total() % _PROGRESS_EVERY)
        bar.set_postfix_str("flushing")
        producer.flush()
    return counts


@contextlib.contextmanager
def _manifest(path: Path | None) -> Iterator[IO[bytes] | None]:
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        yield handle


def _manifest_line(message: Outgoing) -> bytes:
    record: dict[str, Any] = {"kind": message.kind}
    if message.event is not None:
        record["event_id"] = message.event["event_id"]
        record["aggregate_id"] = message.event["aggregate_id"]
        record["event_type"] = message.event["event_type"]
    else:
        record["event_id"] = None
        record["poison_reason"] = message.poison_reason
        record["poison_kind"] = message.poison_kind
    if message.partition is not None:
        record["partition"] = message.partition
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
