"""Publishing benchmark: the status transitions of N events to orders.status, exactly once.

    .venv/bin/python bench/publish.py                    # 1,000,000 events, own stack
    .venv/bin/python bench/publish.py --events 200000

What it does, in order:

1. fills `analytics.order_status_history` (and the `order_events` it takes trace_ids from) of a
   fresh database with the transitions of `--events` events: `--events / 4` orders, each
   created -> paid -> shipped -> delivered, one transition per event, written in SQL (the
   landing and dbt have their own benchmarks; this one measures the publish);
2. times `changelog.record_changes` (the diff into publish.status_changelog, one transaction);
3. baseline: a bare idempotent, non-transactional producer sends the same messages (the
   changelog rows, formatted by the publisher's own `message_value`) to a fresh topic, timed
   until flushed;
4. times `producer.publish`: the transactional publisher, from reading its position back to its
   last commit, into another fresh topic;
5. prints machine facts, the rates and the ratio publish / bare produce.

The stack is the project's own under `<repo>/.orderflow-bench-publish` on ports 39592 (Kafka)
and 35932 (Postgres), stopped at the end unless `--keep-stack`.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import log  # noqa: E402
from bench.landing import machine_facts, print_table, start_services  # noqa: E402
from orderflow_dagster.land import session  # noqa: E402
from orderflow_dagster.publish import changelog  # noqa: E402
from orderflow_dagster.publish.producer import DEFAULT_BATCH_SIZE, message_value, publish  # noqa: E402
from orderflow_dagster.stack import manager  # noqa: E402

HOME = REPO / ".orderflow-bench-publish"
KAFKA_PORT, POSTGRES_PORT = 39592, 35932
PARTITIONS = 4

HISTORY = """
create schema analytics;
create table analytics.order_events (event_id uuid primary key, trace_id text);
create table analytics.order_status_history (
    order_id text, event_id uuid, status text, previous_status text,
    transitioned_at timestamptz, sequence_number bigint, updated_at timestamptz,
    primary key (order_id, sequence_number));
create index on analytics.order_status_history (updated_at);
"""
FILL = """
with steps(n, status, previous_status) as (
    values (1, 'created', null), (2, 'paid', 'created'), (3, 'shipped', 'paid'),
           (4, 'delivered', 'shipped')
),
rows as (
    select 'ord-' || lpad(o::text, 8, '0') as order_id, s.n, s.status, s.previous_status,
           gen_random_uuid() as event_id,
           timestamptz '2026-01-01' + (o * 10 + s.n) * interval '1 second' as transitioned_at
    from generate_series(1, %(orders)s) o cross join steps s
),
events as (
    insert into analytics.order_events
    select event_id, 'trace-' || order_id || '-' || n from rows
)
insert into analytics.order_status_history
select order_id, event_id, status, previous_status, transitioned_at, n, now() from rows
"""


def bare_produce(bootstrap: str, topic: str, rows: list[tuple]) -> float:
    from confluent_kafka import Producer

    from orderflow_dagster.ingest.kafka_config import producer_config

    producer = Producer(producer_config(bootstrap))
    published_at = datetime.now(UTC).isoformat()
    started = time.monotonic()
    for row in rows:
        value = message_value(row, published_at)
        headers = [("changelog_seq", str(row[0]).encode()), ("kind", row[3].encode())]
        while True:
            try:
                producer.produce(topic, value=value, key=row[1].encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(120) == 0
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--use-env", action="store_true", help="use ORDERFLOW_* services")
    parser.add_argument("--keep-stack", action="store_true", help="leave the bench stack running")
    args = parser.parse_args(argv)
    services = start_services(args, home=HOME, kafka_port=KAFKA_PORT, postgres_port=POSTGRES_PORT)
    try:
        facts = machine_facts(services.dsn)
        dsn = services.database(f"bench_publish_{uuid.uuid4().hex[:8]}")
        conn = session.connect(dsn)
        log(f"writing the history of {args.events:,} events")
        with conn.transaction():
            conn.execute(HISTORY)
            conn.execute(FILL, {"orders": args.events // 4})
        started = time.monotonic()
        recorded = changelog.record_changes(conn, "analytics")
        diff_s = time.monotonic() - started
        rows = changelog.rows_after(conn, 0, 10 * args.events)
        suffix = uuid.uuid4().hex[:8]
        bare_topic, status_topic = f"bench.bare-{suffix}", f"bench.status-{suffix}"
        manager.ensure_topics(
            services.bootstrap, {bare_topic: PARTITIONS, status_topic: PARTITIONS}
        )
        log(f"bare idempotent produce of {len(rows):,} messages")
        bare_s = bare_produce(services.bootstrap, bare_topic, rows)
        del rows
        log("transactional publish")
        published = publish(
            conn, services.bootstrap, status_topic, f"bench-{suffix}", batch_size=args.batch
        )
        conn.close()
        n = published.messages
        results = [
            ("events", f"{args.events:,} ({recorded.transitions:,} transitions)"),
            ("changelog diff", f"{diff_s:.1f} s ({recorded.transitions / diff_s:,.0f} rows/s)"),
            ("baseline: bare idempotent produce", f"{bare_s:.1f} s ({n / bare_s:,.0f} msg/s)"),
            (
                f"transactional publish (transactions of {args.batch:,})",
                f"{published.seconds:.1f} s ({n / published.seconds:,.0f} transitions/s,"
                f" {published.transactions} transactions)",
            ),
            ("ratio publish / bare produce", f"{bare_s / published.seconds:.2f}x"),
        ]
        print_table(facts, results)
    finally:
        if services.cfg is not None and not args.keep_stack:
            manager.stop(services.cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
