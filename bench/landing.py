"""Landing benchmark: N events from Kafka into Postgres through the real landing code.

    .venv/bin/python bench/landing.py                      # 1,000,000 events, own stack
    .venv/bin/python bench/landing.py --events 100000 --markdown
    .venv/bin/python bench/landing.py --repeat 3           # shared machine: best of 3, alternating
    .venv/bin/python bench/landing.py --use-env            # ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS,
                                                           # ORDERFLOW_POSTGRES_DSN
    .venv/bin/python bench/landing.py --events 100000 --profile /tmp/landing.prof

What it does, in order:

1. produces `--events` messages from the demo generator (poison 0.1 %, duplicates 1 %) into a fresh
   topic with `--partitions` partitions (default 1, so every planned range holds exactly
   `--batch` offsets and the figure is the cost of one sequential landing process);
2. baseline: reads the same records back from Kafka and formats them with the landing's own COPY
   formatting, in memory and untimed, then times only a bare `COPY ... FROM STDIN` of those bytes
   into fresh tables created `like raw.order_events including all` (same columns, types, primary
   key, jsonb payload, BRIN index; dead letters likewise). The tables are created in an earlier,
   committed transaction: with wal_level=minimal a COPY into a table created in the same
   transaction skips WAL, which the landing never does;
3. landing: in a child process (fresh database, fresh consumer group), plans with
   `planner.plan_ranges(max_events_per_batch=--batch)` and lands every range with
   `landing.land_range`; only the landing loop is timed. Its peak memory is the child's
   `ru_maxrss` (getrusage(RUSAGE_CHILDREN) in a tiny launcher process whose only child it is: see
   LAUNCHER for why the benchmark process itself cannot be the parent), cross-checked with the
   child's own VmHWM. The same is repeated with `--batch / 10` to show that peak memory does not
   depend on the range size;
4. prints machine facts, the rates and the ratio landing / bare COPY, and with `--markdown` a
   block for docs/benchmarks.md.

The stack is the project's own (`orderflow_dagster.stack.manager`) under `<repo>/.orderflow-bench`
on ports 39192 (Kafka) and 35532 (Postgres), stopped at the end unless `--keep-stack`. Databases
and the topic of the run are dropped at the end unless `--keep-data`.

`--profile PATH` lands in-process under cProfile instead (no baseline, no memory runs), writes the
stats to PATH and prints the top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import confluent_kafka
import psycopg
from _common import log, proc_cpu_s, proc_field  # bench/_common.py, beside this script
from psycopg import sql

from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import (
    DEAD_LETTER_COLUMNS,
    EVENT_COLUMNS,
    land_range,
)
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.stack import manager

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = REPO / ".orderflow-bench"
KAFKA_PORT = 39192
POSTGRES_PORT = 35532
POISON_RATE = 0.001
DUPLICATE_RATE = 0.01
MESSAGES_PER_ORDER = 3.0  # the generator emits ~3.2 per order at these rates: over-ask, then cut
CHILD_DSN_ENV = "ORDERFLOW_BENCH_CHILD_DSN"  # the DSN holds a password: not on the command line
TARGET_RATIO = 0.6


# -- machine facts --------------------------------------------------------------------------------


def machine_facts(dsn: str) -> dict[str, str]:
    mem_kb = proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 1024**2:.1f} GiB" if mem_kb else "unknown"
    with psycopg.connect(dsn, autocommit=True) as conn:
        pg = conn.execute("show server_version").fetchone()[0]
    return {
        "cores (os.cpu_count)": str(os.cpu_count()),
        "memory": mem,
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql server": pg,
        "librdkafka": confluent_kafka.libversion()[0],
        "confluent-kafka": confluent_kafka.__version__,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "code": code_version(),
    }


def code_version() -> str:
    """The commit the landing code comes from, and whether orderflow_dagster/ differs from it
    (the working tree may be edited while a benchmark runs)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "orderflow_dagster")
    return f"{head}{' + uncommitted changes in orderflow_dagster/' if dirty else ''}"


def thread_schedstat() -> list[float]:
    """This thread's [seconds on a CPU, seconds runnable but waiting for a CPU] (Linux)."""
    try:
        on_cpu, waiting, _ = Path("/proc/thread-self/schedstat").read_text().split()
    except (OSError, ValueError):
        return []
    return [int(on_cpu) / 1e9, int(waiting) / 1e9]


def vm_status_kb(name: str) -> int:
    value = proc_field("/proc/self/status", name)
    return int(value.split()[0]) if value else 0


# -- services, databases, topics ------------------------------------------------------------------


@dataclass
class Services:
    bootstrap: str
    dsn: str  # maintenance database: creates and drops the per-phase databases
    cfg: manager.StackConfig | None = None  # set when we started the stack ourselves
    databases: list[str] = field(default_factory=list)

    def database(self, name: str) -> str:
        """A fresh, empty database; returns its DSN."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        self.databases.append(name)
        return psycopg.conninfo.make_conninfo(self.dsn, dbname=name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
        self.databases.remove(name)

    def checkpoint(self) -> None:
        """Start each timed phase with no dirty buffers left over from the previous one."""
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("checkpoint")
        except psycopg.Error as exc:  # not a superuser (--use-env): measure anyway
            log(f"checkpoint skipped: {exc}")


def start_services(
    args: argparse.Namespace,
    *,
    home: Path = BENCH_HOME,
    kafka_port: int = KAFKA_PORT,
    postgres_port: int = POSTGRES_PORT,
) -> Services:
    if args.use_env:
        bootstrap = os.environ.get("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS")
        dsn = os.environ.get("ORDERFLOW_POSTGRES_DSN")
        if not bootstrap or not dsn:
            sys.exit("--use-env needs ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS and ORDERFLOW_POSTGRES_DSN")
        return Services(bootstrap, dsn)
    cfg = manager.StackConfig(
        home=home,
        kafka_port=kafka_port,
        postgres_port=postgres_port,
        kafka_libs=REPO / ".orderflow" / "kafka" / "libs",
    )
    log(f"starting the bench stack in {home} (Kafka :{kafka_port}, Postgres :{postgres_port})")
    info = manager.start(cfg)
    return Services(info.bootstrap_servers, info.dsn, cfg)


def delete_topic(bootstrap: str, topic: str) -> None:
    from orderflow_dagster.stack.kafka import admin_client

    # keep the client referenced until its futures resolve: a client collected earlier fails them
    admin = admin_client(bootstrap)
    for future in admin.delete_topics([topic], request_timeout=30).values():
        try:
            future.result()
        except Exception as exc:
            log(f"could not delete topic {topic}: {exc}")


# -- producing ------------------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, events: int, partitions: int, id_version: int = 7) -> dict:
    orders = math.ceil(events / MESSAGES_PER_ORDER) + 10
    stream = generate(
        orders,
        seed=1,
        num_partitions=partitions,
        poison_rate=POISON_RATE,
        duplicate_rate=DUPLICATE_RATE,
        event_id_version=id_version,
    )
    kinds: Counter[str] = Counter()
    started = time.perf_counter()
    with EventProducer(bootstrap, topic=topic) as producer:
        for msg in itertools.islice(stream, events):
            producer.produce_raw(msg.value, msg.key, msg.partition)
            kinds[msg.kind] += 1
            if (n := kinds.total()) % 200_000 == 0:
                log(f"  produced {n:,}")
    seconds = time.perf_counter() - started
    if kinds.total() != events:
        raise SystemExit(f"the generator gave {kinds.total()} messages, wanted {events}")
    return {"messages": events, "kinds": dict(kinds), "seconds": seconds}


# -- landing (run in a child process, or in-process under cProfile) -------------------------------


def land_topic(bootstrap: str, dsn: str, topic: str, batch: int, events: int) -> dict:
    """Plan the whole topic into ranges of at most `batch`, then land every range. Only the
    landing loop is timed."""
    group = f"orderflow-bench-{uuid.uuid4().hex[:8]}"
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    consumer = kafka_source.open_consumer(bootstrap, group)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            store.ensure_schema(conn)
            plan = plan_ranges(
                conn,
                consumer,
                topic,
                max_events_per_batch=batch,
                max_inflight=math.ceil(events / batch) + 1024,
            )
            rss_before_kb = vm_status_kb("VmHWM")
            sched_started = thread_schedstat()
            backend = conn.info.backend_pid
            backend_cpu_started = proc_cpu_s(backend)
            started, cpu_started = time.perf_counter(), time.process_time()
            results = [
                land_range(rng, conn=conn, consumer=consumer, run_id=run_id)
                for rng in plan.unlanded
            ]
            seconds = time.perf_counter() - started
            cpu_s = time.process_time() - cpu_started
            backend_cpu = proc_cpu_s(backend)
            sched = [b - a for a, b in zip(sched_started, thread_schedstat(), strict=True)]
            table_rows, table_dead = conn.execute(
                "select (select count(*) from raw.order_events),"
                " (select count(*) from raw.dead_letters)"
            ).fetchone()
    finally:
        consumer.close()
    per_range = [r.duration_s for r in results]
    return {
        "batch": batch,
        "ranges": len(results),
        "messages": sum(r.messages_read for r in results),
        "rows": sum(r.rows_landed for r in results),
        "dead": sum(r.dead_letters for r in results),
        "table_rows": table_rows,
        "table_dead": table_dead,
        "seconds": seconds,
        "cpu_s": cpu_s,  # all threads of the landing process (librdkafka's included)
        # the landing's Postgres backend, when the server runs on this host
        "backend_cpu_s": (
            backend_cpu - backend_cpu_started
            if backend_cpu is not None and backend_cpu_started is not None
            else None
        ),
        # the main (Python) thread: seconds on a CPU, and runnable but waiting for one
        "main_on_cpu_s": sched[0] if sched else None,
        "main_runqueue_s": sched[1] if sched else None,
        "range_s_min": min(per_range, default=0.0),
        "range_s_max": max(per_range, default=0.0),
        "hwm_before_landing_kb": rss_before_kb,
    }


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = land_topic(
        spec["bootstrap"], os.environ[CHILD_DSN_ENV], spec["topic"], spec["batch"], spec["events"]
    )
    result["hwm_self_kb"] = vm_status_kb("VmHWM")
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# Run by `python -S -c`: a fresh, tiny process (a few MiB) that spawns the landing process and
# reports getrusage(RUSAGE_CHILDREN) for that one child. The landing process must not be spawned
# by the benchmark itself: Linux carries the spawning process's RSS high-water mark into the
# child's ru_maxrss (fork copies the RSS counters; vfork/posix_spawn share the parent's mm until
# exec, and exec keeps that mm's high-water mark), so a child of a parent that once held the COPY
# text would report the parent's peak, whatever it did itself.
LAUNCHER = """
import json, os, resource, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status = os.waitpid(pid, 0)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open("/proc/self/status") as f:
    hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM")][0]
with open(out, "w") as f:
    json.dump({"ru_maxrss_kb": usage.ru_maxrss, "user_s": usage.ru_utime,
               "sys_s": usage.ru_stime, "launcher_hwm_kb": hwm}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def land_in_child(services: Services, dsn: str, topic: str, batch: int, events: int) -> dict:
    """Land the topic in a child process; its peak RSS is the child's ru_maxrss."""
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp:
        out, usage_out = Path(tmp) / "result.json", Path(tmp) / "rusage.json"
        spec = {"bootstrap": services.bootstrap, "topic": topic, "batch": batch, "events": events}
        spec["out"] = str(out)
        child = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        proc = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER, str(usage_out), *child],
            env={**os.environ, CHILD_DSN_ENV: dsn},
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"landing child (batch {batch}) failed with {proc.returncode}")
        result = json.loads(out.read_text())
        result.update(json.loads(usage_out.read_text()))
    return result


# -- bare COPY baseline ---------------------------------------------------------------------------


def read_records(bootstrap: str, topic: str) -> Iterator[tuple[int, list]]:
    consumer = kafka_source.open_consumer(bootstrap, f"orderflow-bench-read-{uuid.uuid4().hex[:8]}")
    try:
        parts = kafka_source.partitions(consumer, topic)
        for p, (low, high) in kafka_source.watermarks(consumer, topic, parts).items():
            if high > low:
                for msgs in kafka_source.read_span(consumer, topic, p, low, high):
                    yield p, msgs
    finally:
        consumer.close()


def validation_row() -> tuple[str, str]:
    """The schema registry's share of the per-event work, measured in this run (the rule: it
    must not halve throughput)."""
    from validation import measure  # bench/validation.py, beside this script

    v = measure()
    return (
        "diagnostic: schema validation",
        f"per-event work {v['with']:,.0f} events/s with it, {v['without']:,.0f} without"
        f" (ratio {v['with'] / v['without']:.2f}; rule >= 0.5)",
    )


def build_copy_text(bootstrap: str, topic: str, run_id: str, chunk_rows: int = 5000) -> dict:
    """COPY text for every record of the topic, formatted exactly as the landing formats it,
    pre-encoded to bytes. Untimed for the baseline; the split between reading and formatting is
    kept as a diagnostic."""
    # the landing's own per-record formatting, so both sides send the same bytes (a private
    # class: only its constructor, add() and the events/dead line lists are relied on)
    from orderflow_dagster.land.landing import _Batch
    from orderflow_dagster.land.ranges import OffsetRange

    events: list[bytes] = []
    dead: list[bytes] = []
    counts = Counter()
    read_s = format_s = 0.0
    batches: dict[int, _Batch] = {}
    it = read_records(bootstrap, topic)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        t1 = time.perf_counter()
        read_s += t1 - t0
        if item is None:
            break
        p, msgs = item
        batch = batches.get(p)
        if batch is None:
            batch = batches[p] = _Batch(OffsetRange(topic, p, 0, 1), run_id, 1_048_576)
        for msg in msgs:
            batch.add(msg)
        counts["messages"] += len(msgs)
        if len(batch.events) + len(batch.dead) >= chunk_rows:
            _drain(batch, events, dead, counts)
        format_s += time.perf_counter() - t1
    t1 = time.perf_counter()
    for batch in batches.values():
        _drain(batch, events, dead, counts)
    format_s += time.perf_counter() - t1
    return {
        "events": events,
        "dead": dead,
        "rows": counts["rows"],
        "dead_rows": counts["dead"],
        "messages": counts["messages"],
        "bytes": sum(map(len, events)) + sum(map(len, dead)),
        "read_s": read_s,
        "format_s": format_s,
    }


def _drain(batch, events: list[bytes], dead: list[bytes], counts: Counter) -> None:
    if batch.events:
        events.append("".join(batch.events).encode())
        counts["rows"] += len(batch.events)
    if batch.dead:
        dead.append("".join(batch.dead).encode())
        counts["dead"] += len(batch.dead)
    batch.events.clear()
    batch.dead.clear()


def bare_copy(services: Services, dsn: str, text: dict) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.ensure_schema(conn)
        conn.execute("create schema bench")
        # The target's baseline: the event rows with their jsonb payload and primary key (and the
        # BRIN on landed_at). Not the event_id index: that is the landing's own bookkeeping (its
        # duplicate check), so its cost counts against the landing, not in the baseline.
        conn.execute(
            "create table bench.copy_baseline (like raw.order_events including all"
            " excluding indexes, primary key (topic, kafka_partition, kafka_offset))"
        )
        conn.execute("create index on bench.copy_baseline using brin (landed_at)")
        conn.execute(
            "create table bench.dead_letters_baseline (like raw.dead_letters including all)"
        )
        services.checkpoint()
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"copy bench.copy_baseline ({EVENT_COLUMNS}) from stdin") as copy:
                for chunk in text["events"]:
                    copy.write(chunk)
            if text["dead"]:
                with cur.copy(
                    f"copy bench.dead_letters_baseline ({DEAD_LETTER_COLUMNS}) from stdin"
                ) as copy:
                    for chunk in text["dead"]:
                        copy.write(chunk)
        seconds = time.perf_counter() - started
        rows = conn.execute("select count(*) from bench.copy_baseline").fetchone()[0]
        dead = conn.execute("select count(*) from bench.dead_letters_baseline").fetchone()[0]
        extra = copy_bookkeeping_rows(services, conn)
    # what the event_id index adds to a COPY of the events, plus a COPY of the audit rows
    bookkeeping_s = max(0.0, extra["indexed_events_s"] - seconds) + extra["audit_s"]
    return {"rows": rows, "dead": dead, "seconds": seconds, "bookkeeping_s": bookkeeping_s, **extra}


# the event columns with landed_at: copied out of the baseline table and back in unchanged
COPY_BACK_COLUMNS = f"{EVENT_COLUMNS}, landed_at"


def copy_bookkeeping_rows(services: Services, conn: psycopg.Connection) -> dict[str, float]:
    """Seconds for bare COPYs of what the landing writes besides the baseline's rows, as
    {"indexed_events_s": the baseline's events COPYed again into a copy of its table that also
    has the event_id index (the caller subtracts the baseline's own time), "audit_s": one
    audit.ingest_log row per record}. Their COPY text is derived untimed from the baseline
    tables. A diagnostic: the target compares the landing with the events-only COPY."""
    events, audit = io.BytesIO(), io.BytesIO()
    with conn.cursor() as cur:
        for sink, query in (
            (events, f"copy bench.copy_baseline ({COPY_BACK_COLUMNS}) to stdout"),
            (
                audit,
                "copy (select topic, kafka_partition, kafka_offset, event_id, 'landed', null,"
                " run_id, 'bench|0|000000000000-000000100000', trace_id from bench.copy_baseline"
                " union all select topic, kafka_partition, kafka_offset, null, 'dead_lettered',"
                " reason, run_id, 'bench|0|000000000000-000000100000', null"
                " from bench.dead_letters_baseline order by 3) to stdout",
            ),
        ):
            with cur.copy(query) as copy:
                for data in copy:
                    sink.write(data)
        conn.execute("create table bench.indexed_baseline (like bench.copy_baseline including all)")
        conn.execute("create index on bench.indexed_baseline (event_id)")
        conn.execute("create table bench.audit_baseline (like audit.ingest_log including all)")
        services.checkpoint()
        started = time.perf_counter()
        with conn.transaction():
            with cur.copy(f"copy bench.indexed_baseline ({COPY_BACK_COLUMNS}) from stdin") as copy:
                copy.write(events.getvalue())
            indexed_s = time.perf_counter() - started
            with cur.copy(
                "copy bench.audit_baseline (topic, kafka_partition, kafka_offset, event_id,"
                " outcome, reason, run_id, partition_key, trace_id) from stdin"
            ) as copy:
                copy.write(audit.getvalue())
        return {"indexed_events_s": indexed_s, "audit_s": time.perf_counter() - started - indexed_s}


# -- report ---------------------------------------------------------------------------------------


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f} MiB"


def report_rows(r: dict) -> list[tuple[str, str]]:
    land, small, base, text = r["landing"], r.get("landing_small"), r["baseline"], r["copy_text"]
    land_rate = rate(land["messages"], land["seconds"])
    base_rate = rate(base["rows"] + base["dead"], base["seconds"])
    rows = [
        (
            "events produced",
            f"{r['produce']['messages']:,} ({_kinds(r['produce']['kinds'])};"
            f" UUIDv{r['produce'].get('event_ids', 7)} event ids)",
        ),
        ("topic partitions", str(r["partitions"])),
        (
            f"landing, ranges of {land['batch']:,}",
            f"{land_rate:,.0f} events/s ({land['messages']:,} in {land['seconds']:.1f} s,"
            f" {land['ranges']} ranges)",
        ),
        (
            "bare COPY baseline",
            f"{base_rate:,.0f} rows/s ({base['rows'] + base['dead']:,} in"
            f" {base['seconds']:.1f} s, {text['bytes'] / 2**20:,.0f} MiB of COPY text)",
        ),
        (
            "ratio landing / bare COPY",
            f"{land_rate / base_rate:.2f} (target >= {TARGET_RATIO})" if base_rate else "n/a",
        ),
        (
            "diagnostic: bare COPY of everything the landing writes",
            f"{base['seconds'] + base['bookkeeping_s']:.1f} s: the events plus"
            f" {base['bookkeeping_s']:.1f} s for their event_id index entries and audit rows"
            f" (events into a table with that index {base['indexed_events_s']:.1f} s, audit rows"
            f" {base['audit_s']:.1f} s); landing /"
            f" that = {(base['seconds'] + base['bookkeeping_s']) / land['seconds']:.2f}",
        ),
        peak_rss(land),
    ]
    if small:
        small_rate = rate(small["messages"], small["seconds"])
        rows += [
            peak_rss(small),
            (
                f"landing, ranges of {small['batch']:,}",
                f"{small_rate:,.0f} events/s ({small['messages']:,} in {small['seconds']:.1f} s,"
                f" {small['ranges']} ranges)",
            ),
        ]
    rep = r["repeat"]
    if len(rep["landing_s"]) > 1:
        rows.append(
            (
                f"best of {len(rep['landing_s'])} (all runs, s)",
                "landing "
                + ", ".join(f"{x:.1f}" for x in rep["landing_s"])
                + "; bare COPY "
                + ", ".join(f"{x:.1f}" for x in rep["baseline_s"])
                + "; ratio per pair "
                + ", ".join(
                    f"{copy_s / land_s:.2f}"
                    for land_s, copy_s in zip(rep["landing_s"], rep["baseline_s"], strict=True)
                ),
            )
        )
    rows += [
        (
            "diagnostic: Kafka read only",
            f"{rate(text['messages'], text['read_s']):,.0f} msg/s ({text['read_s']:.1f} s)",
        ),
        (
            "diagnostic: parse + format only",
            f"{rate(text['messages'], text['format_s']):,.0f} msg/s ({text['format_s']:.1f} s)",
        ),
        validation_row(),
        (
            "diagnostic: landing process CPU",
            f"{land['cpu_s']:.1f} s CPU in {land['seconds']:.1f} s of landing"
            f" ({land['cpu_s'] / land['seconds']:.0%} of one core)",
        ),
        main_thread_row(land),
        backend_row(land),
        (
            "produce (generate + send)",
            f"{rate(r['produce']['messages'], r['produce']['seconds']):,.0f} msg/s",
        ),
    ]
    return rows


def main_thread_row(land: dict) -> tuple[str, str]:
    """Where the landing's Python thread spent the landing: on a CPU, waiting for a CPU that
    other processes held (a busy machine), or blocked (on Postgres, Kafka, locks)."""
    on_cpu, queued = land.get("main_on_cpu_s"), land.get("main_runqueue_s")
    if on_cpu is None:
        return ("diagnostic: landing main thread", "n/a (no /proc/thread-self/schedstat)")
    blocked = max(0.0, land["seconds"] - on_cpu - queued)
    return (
        "diagnostic: landing main thread",
        f"{on_cpu:.1f} s on CPU, {queued:.1f} s waiting for a CPU,"
        f" {blocked:.1f} s blocked (Postgres, Kafka)",
    )


def backend_row(land: dict) -> tuple[str, str]:
    cpu = land.get("backend_cpu_s")
    if cpu is None:
        return ("diagnostic: Postgres backend CPU", "n/a (the server is not on this host)")
    return (
        "diagnostic: Postgres backend CPU",
        f"{cpu:.1f} s in {land['seconds']:.1f} s of landing ({cpu / land['seconds']:.0%}):"
        " the one connection every statement of a landing runs on",
    )


def peak_rss(land: dict) -> tuple[str, str]:
    return (
        f"peak RSS, ranges of {land['batch']:,}",
        f"{mib(land['ru_maxrss_kb'])} ru_maxrss (own VmHWM {mib(land['hwm_self_kb'])};"
        f" {mib(land['hwm_before_landing_kb'])} before the first range;"
        f" launcher {mib(land['launcher_hwm_kb'])})",
    )


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{kinds.get(k, 0):,} {k}" for k in ("event", "duplicate", "poison"))


def print_table(facts: dict[str, str], rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k in [*facts, *(k for k, _ in rows)])
    print()
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def print_markdown(facts: dict[str, str], rows: list[tuple[str, str]], command: str) -> None:
    today = dt.date.today().isoformat()
    machine = (
        f"{facts['cores (os.cpu_count)']} cores ({facts['cpu']}), {facts['memory']} RAM,"
        f" Python {facts['python']}, PostgreSQL {facts['postgresql server']},"
        f" librdkafka {facts['librdkafka']}, psycopg {facts['psycopg']}"
    )
    print()
    print(f"Run on {today}: {machine}. Code: {facts['code']}.")
    print()
    print(f"Command: `{command}`")
    print()
    print("| measure | result |")
    print("| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="messages to produce (default 1000000)"
    )
    parser.add_argument(
        "--batch", type=int, default=100_000, help="max events per planned range (default 100000)"
    )
    parser.add_argument(
        "--partitions", type=int, default=1, help="partitions of the bench topic (default 1)"
    )
    parser.add_argument(
        "--event-ids",
        type=int,
        choices=(7, 4),
        default=7,
        help="UUID version of the generated event ids: 7 (time-ordered, as orderflow's producer"
        " mints them; default) or 4 (random, as some other producers send)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print a markdown block")
    parser.add_argument("--use-env", action="store_true", help="use ORDERFLOW_* services")
    parser.add_argument("--keep-stack", action="store_true", help="leave the bench stack running")
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the run's topic and databases"
    )
    parser.add_argument(
        "--profile", metavar="PATH", help="land in-process under cProfile, write stats to PATH"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure bare COPY and landing N times each, alternating, and report the best"
        " (for shared or noisy machines; default 1)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.partitions, args.repeat) < 1:
        parser.error("--events, --batch, --partitions and --repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python bench/landing.py", *given])
    services = start_services(args)
    run = uuid.uuid4().hex[:8]
    topic = f"orders.bench-{run}"
    try:
        facts = machine_facts(services.dsn)
        manager.ensure_topics(services.bootstrap, {topic: args.partitions})
        log(f"producing {args.events:,} messages to {topic} ({args.partitions} partition(s))")
        produced = produce(services.bootstrap, topic, args.events, args.partitions, args.event_ids)
        produced["event_ids"] = args.event_ids
        log(f"produced in {produced['seconds']:.1f} s")

        if args.profile:
            return profile(services, topic, args, f"bench_{run}_profile")

        log("baseline: reading the records back and formatting the COPY text (untimed)")
        text = build_copy_text(services.bootstrap, topic, f"bench-{run}")
        log(f"  {text['bytes'] / 2**20:,.0f} MiB in {text['read_s'] + text['format_s']:.1f} s")

        # bare COPY and landing alternate, so that a load change on a shared machine hits both
        baselines, landings = [], []
        for i in range(args.repeat):
            db = f"bench_{run}_copy_{i}"
            baseline = bare_copy(services, services.database(db), text)
            if not args.keep_data:
                services.drop(db)
            log(
                f"  bare COPY: {baseline['rows'] + baseline['dead']:,} rows"
                f" in {baseline['seconds']:.1f} s"
            )
            baselines.append(baseline)
            landings.append(
                land_once(services, topic, run, args.batch, i, produced, baseline, args)
            )
        del text["events"], text["dead"]
        small = None
        if args.batch // 10 >= 1:
            small = land_once(services, topic, run, args.batch // 10, 0, produced, baseline, args)

        results = {
            "produce": produced,
            "partitions": args.partitions,
            "copy_text": text,
            "baseline": min(baselines, key=lambda b: b["seconds"]),
            "landing": min(landings, key=lambda r: r["seconds"]),
            "landing_small": small,
            "repeat": {
                "baseline_s": [b["seconds"] for b in baselines],
                "landing_s": [r["seconds"] for r in landings],
            },
        }
        rows = report_rows(results)
        rows.append(("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
        print_table(facts, rows)
        if args.markdown:
            print_markdown(facts, rows, command)
        return 0
    finally:
        cleanup(services, topic, args)


def land_once(
    services: Services,
    topic: str,
    run: str,
    batch: int,
    attempt: int,
    produced: dict,
    baseline: dict,
    args: argparse.Namespace,
) -> dict:
    db = f"bench_{run}_land_{batch}_{attempt}"
    dsn = services.database(db)
    services.checkpoint()
    log(f"landing in a child process, ranges of {batch:,}")
    result = land_in_child(services, dsn, topic, batch, args.events)
    log(
        f"  {result['messages']:,} in {result['seconds']:.1f} s,"
        f" peak RSS {mib(result['ru_maxrss_kb'])}"
    )
    check_landed(result, produced, baseline)
    if not args.keep_data:
        services.drop(db)
    return result


def check_landed(result: dict, produced: dict, baseline: dict) -> None:
    """The landing must have stored exactly what the baseline stored: every message once."""
    if result["messages"] != produced["messages"] or (
        result["table_rows"],
        result["table_dead"],
    ) != (
        baseline["rows"],
        baseline["dead"],
    ):
        raise SystemExit(f"landing stored something else than the baseline: {result} vs {baseline}")


def profile(services: Services, topic: str, args: argparse.Namespace, db: str) -> int:
    dsn = services.database(db)
    services.checkpoint()
    profiler = cProfile.Profile()
    log(f"landing in-process under cProfile, ranges of {args.batch:,}")
    profiler.enable()
    result = land_topic(services.bootstrap, dsn, topic, args.batch, args.events)
    profiler.disable()
    profiler.dump_stats(args.profile)
    log(
        f"  {result['messages']:,} in {result['seconds']:.1f} s under the profiler"
        f" ({rate(result['messages'], result['seconds']):,.0f} events/s); stats in {args.profile}"
    )
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(25)
        print(out.getvalue())
    if not args.keep_data:
        services.drop(db)
    return 0


def cleanup(services: Services, topic: str, args: argparse.Namespace) -> None:
    if not args.keep_data:
        for db in list(services.databases):
            with contextlib.suppress(psycopg.Error):
                services.drop(db)
        delete_topic(services.bootstrap, topic)
    if services.cfg is not None and not args.keep_stack:
        log("stopping the bench stack")
        manager.stop(services.cfg)


if __name__ == "__main__":
    sys.exit(main())
