"""History benchmark: a sensor tick, a landing and a commit repair, on no history and on a year.

    .venv/bin/python bench/history.py                      # 1,000,000 historic ranges, own stack
    .venv/bin/python bench/history.py --ranges 200000 --dagster-partitions 20000 --reps 5
    .venv/bin/python bench/history.py --use-env            # ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS,
                                                           # ORDERFLOW_POSTGRES_DSN

What it does, in order:

1. creates a topic of `--partitions` partitions and writes `--ranges` tiny records to it, spread
   over the partitions, then deletes them (DeleteRecords, as retention would): Kafka's log of
   each partition starts where a year of history ends, as it does after a year in production;
   then produces the head, real events (demo generator) on partition 0: `--batch` per range
   landed by the benchmark, and two ranges more;
2. two databases over the same topic, each with its own consumer group: "empty", where nothing
   was planned or landed (the planner starts at the log start), and "year", where one plan row
   and one ledger row per historic range cover every offset below the log start (inserted with
   generate_series, landed_at spread over a year, then VACUUM ANALYZE, as autovacuum would have
   left them), with the consumer group committed to the end of it. Only the plan and the ledger
   are simulated: raw.order_events and the audit log of the year are not (their indexes deepen
   with any data, and none of the three paths measured scans them);
3. a throwaway Dagster instance per database (SQLite in a temporary directory): the empty one
   holds no dynamic partitions, the year's `--dagster-partitions` keys of historic ranges;
4. then, alternating between the two databases, `--reps` cycles of what a deployment does, each
   timed with the same code the sensor and the landing run:
   - planning tick: `plan_ranges` + `repair_kafka_commits` + the sensor's bounded Dagster lookups
     (`missing_partitions` and `runs_by_partition` for the unlanded keys); it plans the range the
     previous landing made room for (the new key is then added to the instance, untimed, as the
     daemon would);
   - steady tick: the same again, with nothing new to plan (backpressure), `--steady` times;
   - landing: `land_range` of the oldest unlanded range (`--batch` events);
   - commit repair: `repair_kafka_commits` of every partition, `--steady` times;
   - dbt sensor marker: `store.raw_marker_counts`, `--steady` times;
   a first cycle warms both up and is not counted;
5. prints machine facts, the median of each figure on both histories, and the ratio year/empty
   (target <= 1.2x); diagnostics show what the whole-history reads the paths no longer do cost on
   the year (the full plan + ledger read, one partition's whole ledger, every dynamic partition
   key).

The stack is bench/landing.py's (`<repo>/.orderflow-bench`, Kafka 39192, Postgres 35532), stopped
at the end unless `--keep-stack`; the topic and databases are dropped unless `--keep-data`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import confluent_kafka
import psycopg
from _common import log  # bench/_common.py, beside this script
from confluent_kafka.admin import AdminClient
from dagster import DagsterInstance
from landing import (  # bench/landing.py, beside this script
    cleanup,
    machine_facts,
    print_table,
    start_services,
)

from orderflow_dagster.defs.assets import offset_ranges
from orderflow_dagster.defs.sensors import missing_partitions, runs_by_partition
from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range, repair_kafka_commits
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import OFFSET_DIGITS, OffsetRange
from orderflow_dagster.stack import manager

TARGET_RATIO = 1.2
MAX_INFLIGHT = 2
DAGSTER_BATCH = 10_000
HISTORY_DAYS = 365


# -- the topic: a year of offsets gone to retention, and a head of real events -------------------


def write_history_offsets(bootstrap: str, topic: str, per_partition: dict[int, int]) -> None:
    """Tiny records that only take up the offsets of the history, then deleted from the log."""
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    for p, count in per_partition.items():
        for i in range(count):
            while True:
                try:
                    producer.produce(topic, b"h", partition=p)
                    break
                except BufferError:
                    producer.poll(0.1)
            if i % 50_000 == 0:
                producer.poll(0)
        log(f"  partition {p}: {count:,} history offsets written")
    if producer.flush(120) != 0:
        raise SystemExit("history records not delivered")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    requests = [confluent_kafka.TopicPartition(topic, p, n) for p, n in per_partition.items()]
    for future in admin.delete_records(requests).values():
        future.result(timeout=60)


def produce_head(bootstrap: str, topic: str, events: int) -> None:
    with EventProducer(bootstrap, topic=topic) as producer:
        for msg in generate(events, seed=1, poison_rate=0.001, duplicate_rate=0.01):
            producer.produce_raw(msg.value, msg.key, 0)
            events -= 1
            if events == 0:
                return
    raise SystemExit("the generator ran out of events for the head")


# -- the year's plan and ledger -------------------------------------------------------------------

# One plan row per historic range of one offset, keyed as OffsetRange.key spells it, planned_at
# spread evenly over the year, oldest first; each landed as soon as planned.
HISTORY_PLAN = """
insert into raw.ingest_plan (topic, kafka_partition, start_offset, end_offset, partition_key,
                             topic_id, planned_at)
select %(topic)s, p.p, o.o, o.o + 1,
       %(topic)s || '|' || p.p || '|' || lpad(o.o::text, %(digits)s, '0') || '-'
           || lpad((o.o + 1)::text, %(digits)s, '0'),
       %(topic_id)s, now() - make_interval(days => %(days)s) * (1 - o.o::float8 / %(n)s)
from unnest(%(partitions)s::int[], %(ends)s::bigint[]) p(p, n)
cross join lateral generate_series(0::bigint, p.n - 1) o(o)
"""
HISTORY_LEDGER = """
insert into raw.ingest_ledger (topic, kafka_partition, start_offset, end_offset, partition_key,
                               topic_id, landed_at, messages_read, rows_landed, dead_letters,
                               already_landed, run_id, duration_ms, log_start_offset)
select topic, kafka_partition, start_offset, end_offset, partition_key, topic_id, planned_at,
       1, 1, 0, 0, 'history', 40, 0
from raw.ingest_plan where topic = %(topic)s
"""


def simulate_year(dsn: str, topic: str, topic_id: str, per_partition: dict[int, int]) -> None:
    params = {
        "topic": topic,
        "topic_id": topic_id,
        "digits": OFFSET_DIGITS,
        "days": HISTORY_DAYS,
        "n": max(per_partition.values()),
        "partitions": list(per_partition),
        "ends": list(per_partition.values()),
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.ensure_schema(conn)
        conn.execute(
            "insert into raw.topic_incarnations (stream, topic, topic_id, reason)"
            " values (%s, %s, %s, 'first seen')",
            (topic, topic, topic_id),
        )
        started = time.perf_counter()
        conn.execute(HISTORY_PLAN, params)
        conn.execute(HISTORY_LEDGER, params)
        log(f"  plan and ledger of the year inserted in {time.perf_counter() - started:.0f} s")
        marks = conn.execute(
            "select kafka_partition, landed_to from raw.ingest_watermarks where topic = %s",
            (topic,),
        ).fetchall()
        if dict(marks) != per_partition:
            raise SystemExit(f"watermarks of the year {marks} are not its ends {per_partition}")


def vacuum(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("vacuum analyze")


def dagster_instance(home: str, keys: list[str]) -> DagsterInstance:
    instance = DagsterInstance.local_temp(home)
    for i in range(0, len(keys), DAGSTER_BATCH):
        instance.add_dynamic_partitions(offset_ranges.name, keys[i : i + DAGSTER_BATCH])
    return instance


# -- the measured paths ---------------------------------------------------------------------------


@dataclass
class History:
    name: str
    dsn: str
    instance: DagsterInstance
    conn: psycopg.Connection
    consumer: object
    topic: str
    batch: int
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def timed(self, what: str, action: Callable[[], object], *, count: bool = True) -> object:
        started = time.perf_counter()
        result = action()
        if count:
            self.seconds.setdefault(what, []).append(time.perf_counter() - started)
        return result

    def tick(self, what: str, count: bool):
        """What kafka_offset_ranges_sensor does, up to building its result; its parts timed
        apart too (the Kafka round trips of planning and repair vary most on a busy machine)."""
        started = time.perf_counter()
        plan = self.timed(
            f"{what}: plan_ranges",
            lambda: plan_ranges(
                self.conn,
                self.consumer,
                self.topic,
                max_events_per_batch=self.batch,
                max_inflight=MAX_INFLIGHT,
            ),
            count=count,
        )
        self.timed(
            f"{what}: repair_kafka_commits",
            lambda: repair_kafka_commits(
                self.conn, self.consumer, self.topic, topic_id=plan.topic_id
            ),
            count=count,
        )
        keys = [r.key for r in plan.unlanded]

        def lookups() -> list[str]:
            runs_by_partition(self.instance, keys)
            return missing_partitions(self.instance, offset_ranges.name, keys)

        to_add = self.timed(f"{what}: Dagster lookups", lookups, count=count)
        if count:
            self.seconds.setdefault(what, []).append(time.perf_counter() - started)
        return plan, to_add

    def cycle(self, steady: int, count: bool) -> None:
        plan, to_add = self.tick("planning tick", count)
        if to_add:
            self.instance.add_dynamic_partitions(offset_ranges.name, to_add)
        for _ in range(steady):
            self.tick("steady tick", count)
        rng = plan.unlanded[0]
        result = self.timed(
            f"landing of {self.batch:,} events",
            lambda: land_range(rng, conn=self.conn, consumer=self.consumer, run_id="bench"),
            count=count,
        )
        if result.messages_read != rng.size:
            raise SystemExit(f"{self.name}: landed {result.messages_read} of {rng}")
        for _ in range(steady):
            self.timed(
                "commit repair",
                lambda: repair_kafka_commits(self.conn, self.consumer, self.topic),
                count=count,
            )
            self.timed("dbt sensor marker", lambda: store.raw_marker_counts(self.conn), count=count)


def whole_history_reads(year: History, reps: int) -> list[tuple[str, str]]:
    """What the paths read before they had watermarks, timed on the year, for comparison."""

    def median_ms(action: Callable[[], object]) -> float:
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    full = median_ms(lambda: store.topic_progress(year.conn, year.topic))
    spans = median_ms(lambda: store.landed_spans(year.conn, year.topic, 0))
    keys = median_ms(lambda: year.instance.get_dynamic_partitions(offset_ranges.name))
    return [
        ("diagnostic: whole plan + ledger read (year)", f"{full:,.1f} ms per tick, before"),
        ("diagnostic: one partition's whole ledger (year)", f"{spans:,.1f} ms per landing, before"),
        ("diagnostic: every dynamic partition key (year)", f"{keys:,.1f} ms per tick, before"),
    ]


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ranges", type=int, default=1_000_000, help="historic ranges (default 1000000)"
    )
    parser.add_argument(
        "--dagster-partitions",
        type=int,
        default=100_000,
        help="dynamic partitions of the year's Dagster instance (default 100000; 0: none)",
    )
    parser.add_argument("--partitions", type=int, default=4, help="Kafka partitions (default 4)")
    parser.add_argument(
        "--batch", type=int, default=10_000, help="events per landed range (default 10000)"
    )
    parser.add_argument("--reps", type=int, default=15, help="measured cycles (default 15)")
    parser.add_argument(
        "--steady", type=int, default=5, help="steady ticks, repairs per cycle (default 5)"
    )
    parser.add_argument("--use-env", action="store_true", help="use ORDERFLOW_* services")
    parser.add_argument("--keep-stack", action="store_true", help="leave the bench stack running")
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the run's topic and databases"
    )
    args = parser.parse_args(argv)
    if min(args.ranges, args.partitions, args.batch, args.reps, args.steady) < 1:
        parser.error("--ranges, --partitions, --batch, --reps and --steady must be positive")
    if args.dagster_partitions > args.ranges:
        parser.error("--dagster-partitions cannot exceed --ranges")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    services = start_services(args)
    run = uuid.uuid4().hex[:8]
    topic = f"orders.history-{run}"
    with contextlib.ExitStack() as closing:
        closing.callback(cleanup, services, topic, args)
        facts = machine_facts(services.dsn)
        manager.ensure_topics(services.bootstrap, {topic: args.partitions})
        per_partition = {
            p: args.ranges // args.partitions + (1 if p < args.ranges % args.partitions else 0)
            for p in range(args.partitions)
        }
        log(f"writing {args.ranges:,} history offsets to {topic} and deleting them")
        write_history_offsets(services.bootstrap, topic, per_partition)
        head = (args.reps + 1 + MAX_INFLIGHT) * args.batch
        log(f"producing the head: {head:,} events on partition 0")
        produce_head(services.bootstrap, topic, head)

        probe = closing.enter_context(
            contextlib.closing(
                kafka_source.open_consumer(services.bootstrap, f"orderflow-history-probe-{run}")
            )
        )
        topic_id = kafka_source.topic_id(probe, topic)
        lows = kafka_source.watermarks(probe, topic, list(per_partition))
        if {p: low for p, (low, _) in lows.items()} != per_partition:
            raise SystemExit(f"the log does not start where the history ends: {lows}")

        histories = []
        for name in ("empty", "year"):
            dsn = services.database(f"bench_{run}_{name}")
            keys = []
            if name == "year":
                log(f"year: {args.ranges:,} ranges into the plan and the ledger")
                simulate_year(dsn, topic, topic_id, per_partition)
                # keys of historic ranges, as the sensor added them over the year
                keys = [
                    OffsetRange(topic, i % args.partitions, o := i // args.partitions, o + 1).key
                    for i in range(args.dagster_partitions)
                ]
            else:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    store.ensure_schema(conn)
            vacuum(dsn)
            home = closing.enter_context(tempfile.TemporaryDirectory(prefix=f"history-{name}-"))
            log(f"{name}: a Dagster instance with {len(keys):,} dynamic partitions")
            instance = closing.enter_context(dagster_instance(home, keys))
            conn = closing.enter_context(psycopg.connect(dsn, autocommit=True))
            consumer = closing.enter_context(
                contextlib.closing(
                    kafka_source.open_consumer(
                        services.bootstrap, f"orderflow-history-{name}-{run}"
                    )
                )
            )
            history = History(name, dsn, instance, conn, consumer, topic, args.batch)
            # the year's group committed its history long ago
            repair_kafka_commits(conn, consumer, topic)
            histories.append(history)

        services.checkpoint()
        for rep in range(args.reps + 1):
            for history in histories if rep % 2 == 0 else reversed(histories):
                history.cycle(args.steady, count=rep > 0)
            log(f"cycle {rep}{' (warm-up)' if rep == 0 else ''} done")

        empty, year = histories
        rows = []
        worst = 0.0
        # each path, then the parts of a tick (named `<tick>: <part>`) below it
        paths = [w for w in empty.seconds if ":" not in w]
        order = [
            w
            for path in paths
            for w in sorted(
                (k for k in empty.seconds if k.split(":")[0] == path), key=lambda k: ":" in k
            )
        ]
        for what in order:
            samples = empty.seconds[what]
            e = statistics.median(samples)
            y = statistics.median(year.seconds[what])
            if what in paths:
                worst = max(worst, y / e)
            rows.append(
                (
                    what if what in paths else f"  {what.split(': ', 1)[1]}",
                    f"empty {e * 1000:,.2f} ms, year {y * 1000:,.2f} ms: ratio {y / e:.2f}"
                    f" (median of {len(samples)})",
                )
            )
        rows.append(
            (
                "year",
                f"{args.ranges:,} ranges in plan and ledger, {args.dagster_partitions:,} dynamic"
                f" partitions; worst ratio {worst:.2f} (target <= {TARGET_RATIO})",
            )
        )
        rows += whole_history_reads(year, args.steady)
        rows.append(("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
        print_table(facts, rows)
        return 0


if __name__ == "__main__":
    sys.exit(main())
