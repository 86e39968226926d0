"""dbt incremental benchmark: with N events already modelled, land a few thousand new ones and time
the incremental dbt build against the full refresh of the same run.

    .venv/bin/python bench/dbt_incremental.py                   # 1,000,000 modelled, 10,000 new
    .venv/bin/python bench/dbt_incremental.py --events 100000 --new 5000 --markdown
    .venv/bin/python bench/dbt_incremental.py --small-table 0   # skip the 250k-row comparison

The target (from the project's issue): the incremental build costs at most a tenth of the full
refresh, and grows with the new events, not with the table.

What it does, in order:

1. starts the project's own Postgres (`orderflow_dagster.stack.manager`, no Kafka: this benchmark
   is about dbt, not landing) under `<repo>/.orderflow-bench-dbt` on port 35732, creates a fresh
   database and the landing schema (`store.ensure_schema`);
2. lands `--events` raw rows directly with COPY: the demo generator's envelopes (events and
   duplicates, poison skipped), with Kafka coordinates (4 partitions, the producers' key
   partitioner, cross-partition duplicates where the generator puts them, offsets increasing per
   partition), in ranges of 10,000 rows, each range with its own `landed_at` (one simulated hour
   apart, all far older than the 15-minute `landing_lookback`) and its `raw.ingest_ledger` rows,
   then `vacuum analyze` (untimed);
3. times a no-op dbt invocation (`dbt run` selecting nothing: process start, imports, manifest
   load): the fixed cost every invocation pays, whatever the data;
4. times `dbt build --full-refresh` (seeds, models, data tests: what the pipeline runs, unit tests
   are left to CI) and `dbt run --full-refresh` (models only) on those rows;
5. times incremental `dbt build` and `dbt run` with nothing new, then, for 1,000, `--new` and
   50,000 new events, lands a fresh batch (one simulated hour after the previous one, with its
   ledger rows) before each timed invocation, so `build` and `run` each see exactly N new rows;
6. with `--small-table` (default 250,000), repeats the full refresh and the `--new` incremental in
   a second database holding that many rows: the incremental time should not follow the table;
7. checks that the marts hold one row per distinct event and per order of raw (untimed), prints
   machine facts, the figures, the ratios incremental / full refresh for `build` and `run` (with
   and without the fixed cost) against the 1/10 target, and the seconds per dbt node in every
   case (from dbt's run_results.json: every model of `run`, the slowest nodes of `build`).
   `--markdown` also prints a block for docs/benchmarks.md.

`--repeat N` (for shared or noisy machines) times every full refresh N times and every
incremental case N times, each on a fresh batch, and reports the fastest.

Before each timed invocation the database is checkpointed; after each full refresh it is vacuumed
and analyzed, as autovacuum would have done long before the next incremental run in production.
New batches are not vacuumed (the landing does not either). Wall times are the dbt subprocess's,
from spawn to exit, as `run_dbt_build` runs it (same arguments and environment, 2 dbt threads from
the profile). dbt writes its artifacts to `dbt_project/target/bench_dbt_incremental/`; each timed
invocation's run_results.json is kept there under `runs/`.

The stack is stopped at the end unless `--keep-stack`; the databases are dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psycopg
from _common import log, proc_field  # bench/_common.py, beside this script
from psycopg import sql

from orderflow_dagster.ingest.generator import Outgoing, generate
from orderflow_dagster.ingest.kafka_config import default_partition
from orderflow_dagster.land import store
from orderflow_dagster.stack import manager
from orderflow_dagster.transform.dbt import (
    DBT_PROJECT_DIR,
    OUTPUT_TAIL_LINES,
    _dbt_env,
    build_args,
    dbt_executable,
)

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = REPO / ".orderflow-bench-dbt"
KAFKA_PORT = 39392  # never started; only reserved so the config does not clash with other stacks
POSTGRES_PORT = 35732
TARGET_PATH = DBT_PROJECT_DIR / "target" / "bench_dbt_incremental"
TOPIC = "orders.events"
PARTITIONS = 4
SEED = 11
RANGE_ROWS = 10_000  # rows per landed range of the initial load
EXTRA_SIZES = (1_000, 50_000)  # incremental sizes measured besides --new
MESSAGES_PER_ORDER = 3.0  # the generator gives ~3.3 non-poison messages per order: over-ask
ANALYTICS_SCHEMA = "analytics"
STAGING_SCHEMA = "staging"
TARGET_RATIO = 0.1
NOOP_SELECT = "tag:orderflow_bench_selects_nothing"
NOOP_REPEAT = 3
SLOWEST_NODES = 12
EVENT_COLUMNS = (
    "topic",
    "kafka_partition",
    "kafka_offset",
    "event_id",
    "aggregate_id",
    "event_type",
    "schema_version",
    "event_ts_ms",
    "payload",
    "key",
    "headers",
    "trace_id",
    "kafka_ts_ms",
    "landed_at",
    "run_id",
)


# -- machine facts --------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts(dsn: str) -> dict[str, str]:
    mem_kb = proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 1024**2:.1f} GiB" if mem_kb else "unknown"
    with psycopg.connect(dsn, autocommit=True) as conn:
        pg = conn.execute("show server_version").fetchone()[0]
        shared_buffers = conn.execute("show shared_buffers").fetchone()[0]
        work_mem = conn.execute("show work_mem").fetchone()[0]
    return {
        "cores (os.cpu_count)": str(os.cpu_count()),
        "memory": mem,
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql server": f"{pg} (shared_buffers {shared_buffers}, work_mem {work_mem})",
        "dbt-core": _version("dbt-core"),
        "dbt-postgres": _version("dbt-postgres"),
        "dbt threads": "2 (dbt_project/profiles.yml)",
        "load average at start": load_average(),
    }


# -- the raw rows ---------------------------------------------------------------------------------


class Landed:
    """The generator's envelopes (events and duplicates; poison is skipped) as raw.order_events
    rows: Kafka coordinates assigned as the producers would (the key partitioner, or the partition
    the generator chose for a cross-partition duplicate), offsets increasing per partition."""

    def __init__(self, messages: int, seed: int = SEED) -> None:
        orders = math.ceil(messages / MESSAGES_PER_ORDER) + 100
        self._messages: Iterator[Outgoing] = (
            m for m in generate(orders, seed=seed, num_partitions=PARTITIONS) if m.kind != "poison"
        )
        self._next_offset = [0] * PARTITIONS
        self.kinds: Counter[str] = Counter()

    def take(self, n: int, landed_at: dt.datetime, run_id: str) -> list[tuple]:
        rows = []
        for message in self._messages:
            event = message.event
            assert event is not None
            partition = (
                message.partition
                if message.partition is not None
                else default_partition(message.key or b"", PARTITIONS)
            )
            offset = self._next_offset[partition]
            self._next_offset[partition] += 1
            rows.append(
                (
                    TOPIC,
                    partition,
                    offset,
                    event["event_id"],
                    event["aggregate_id"],
                    event["event_type"],
                    event["schema_version"],
                    event["timestamp"],
                    orjson.dumps(event["payload"]).decode(),
                    event["aggregate_id"],
                    None,
                    event.get("trace_id"),
                    event["timestamp"],
                    landed_at,
                    run_id,
                )
            )
            self.kinds[message.kind] += 1
            if len(rows) == n:
                return rows
        raise SystemExit(f"the generator ran out after {self.kinds.total():,} messages")


class Clock:
    """Simulated landing times: one hour apart, so a range is never inside the next one's
    15-minute lookback, and the last one is still in the past."""

    def __init__(self, ranges: int) -> None:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        self._next = now - dt.timedelta(hours=ranges + 1)

    def tick(self) -> dt.datetime:
        current = self._next
        self._next += dt.timedelta(hours=1)
        return current


def land(dsn: str, rows: list[tuple], landed_at: dt.datetime, run_id: str) -> None:
    """COPY the rows and write their ledger entries (one per partition), in one transaction."""
    spans: dict[int, list[int]] = {}
    for row in rows:
        span = spans.setdefault(row[1], [row[2], row[2], 0])
        span[0], span[1], span[2] = min(span[0], row[2]), max(span[1], row[2]), span[2] + 1
    columns = sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS))
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(sql.SQL("copy raw.order_events ({}) from stdin").format(columns)) as copy:
            for row in rows:
                copy.write_row(row)
        cur.executemany(
            """
            insert into raw.ingest_ledger (
                topic, kafka_partition, start_offset, end_offset, partition_key, messages_read,
                rows_landed, dead_letters, already_landed, run_id, landed_at
            ) values (%s, %s, %s, %s, %s, %s, %s, 0, 0, %s, %s)
            """,
            [
                (TOPIC, p, lo, hi + 1, f"{TOPIC}|{p}|{lo}-{hi + 1}", n, n, run_id, landed_at)
                for p, (lo, hi, n) in sorted(spans.items())
            ],
        )


def raw_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select count(*) from raw.order_events").fetchone()[0]


# -- the database ---------------------------------------------------------------------------------


@dataclass
class Server:
    dsn: str  # maintenance database
    cfg: manager.StackConfig | None
    databases: list[str] = field(default_factory=list)

    def database(self, name: str) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        self.databases.append(name)
        dsn = psycopg.conninfo.make_conninfo(self.dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            store.ensure_schema(conn)
        return dsn

    def drop(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
        self.databases.remove(name)


def checkpoint(dsn: str) -> None:
    """Start each timed invocation with no dirty buffers left over from the previous step."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("checkpoint")


def vacuum_analyze(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("vacuum (analyze)")


# -- dbt ------------------------------------------------------------------------------------------


@dataclass
class Timing:
    label: str
    command: str  # "build" or "run"
    wall_s: float
    raw_rows: int  # rows in raw.order_events when dbt ran
    new_rows: int
    elapsed_s: float  # run_results.json elapsed_time
    nodes: list[dict]  # unique_id, type, status, seconds

    def seconds_by_type(self) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for node in self.nodes:
            totals[node["type"]] += node["seconds"]
        return dict(totals)


def dbt(
    dsn: str,
    command: str,
    *,
    label: str,
    full_refresh: bool = False,
    select: str | None = None,
) -> tuple[float, dict]:
    """Run `dbt <command>` as run_dbt_build does (same arguments, same environment), but with
    this benchmark's own target path. Returns the wall time and dbt's run_results.json."""
    # `dbt run` runs no unit tests, and rejects the option that excludes them
    args = build_args(full_refresh=full_refresh, select=select, unit_tests=command != "build")
    args[0] = command
    env = _dbt_env(dsn) | {
        "DBT_TARGET_PATH": str(TARGET_PATH),
        "DBT_LOG_PATH": str(TARGET_PATH),
        "ORDERFLOW_ANALYTICS_SCHEMA": ANALYTICS_SCHEMA,
        "ORDERFLOW_STAGING_SCHEMA": STAGING_SCHEMA,
    }
    results_file = TARGET_PATH / "run_results.json"
    results_file.unlink(missing_ok=True)
    started = time.perf_counter()
    result = subprocess.run(
        [dbt_executable(), *args],
        cwd=DBT_PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-OUTPUT_TAIL_LINES:])
        raise SystemExit(f"dbt {command} ({label}) failed ({result.returncode}):\n{tail}")
    run_results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if run_results:
        kept = TARGET_PATH / "runs" / f"{label}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results_file, kept)
    return wall, run_results


def timed(
    dsn: str, command: str, label: str, new_rows: int, *, full_refresh: bool = False
) -> Timing:
    rows = raw_rows(dsn)
    checkpoint(dsn)
    wall, run_results = dbt(dsn, command, label=label, full_refresh=full_refresh)
    nodes = [
        {
            "unique_id": r["unique_id"],
            "type": r["unique_id"].split(".", 1)[0],
            "status": r["status"],
            "seconds": r["execution_time"],
        }
        for r in run_results.get("results", [])
    ]
    timing = Timing(
        label, command, wall, rows, new_rows, run_results.get("elapsed_time", 0.0), nodes
    )
    by_type = ", ".join(f"{k} {v:.1f}" for k, v in sorted(timing.seconds_by_type().items()))
    log(f"  dbt {command} [{label}]: {wall:.1f} s wall (node seconds: {by_type})")
    return timing


def noop_seconds(dsn: str) -> list[float]:
    """A dbt invocation that selects nothing: start, imports, manifest load, no node."""
    walls = []
    for _ in range(NOOP_REPEAT):
        wall, _results = dbt(dsn, "run", label="noop", select=NOOP_SELECT)
        walls.append(wall)
    return walls


# -- the phases -----------------------------------------------------------------------------------


def load_table(dsn: str, landed: Landed, clock: Clock, events: int, tag: str) -> None:
    log(f"landing {events:,} raw rows ({tag}) in ranges of {RANGE_ROWS:,}")
    started = time.perf_counter()
    done = 0
    while done < events:
        n = min(RANGE_ROWS, events - done)
        at = clock.tick()
        run_id = f"bench-dbt-{tag}-{done // RANGE_ROWS}"
        land(dsn, landed.take(n, at, run_id), at, run_id)
        done += n
        if done % 200_000 == 0:
            log(f"  {done:,}")
    vacuum_analyze(dsn)
    log(f"  landed and analyzed in {time.perf_counter() - started:.1f} s")


def land_new(dsn: str, landed: Landed, clock: Clock, n: int, tag: str) -> None:
    at = clock.tick()
    land(dsn, landed.take(n, at, f"bench-dbt-new-{tag}"), at, f"bench-dbt-new-{tag}")


def full_refresh(dsn: str, repeat: int, prefix: str) -> dict[str, list[Timing]]:
    out: dict[str, list[Timing]] = {"build": [], "run": []}
    for attempt in range(repeat):
        for command in ("build", "run"):
            label = f"{prefix}full-{command}-{attempt}"
            out[command].append(timed(dsn, command, label, 0, full_refresh=True))
            vacuum_analyze(dsn)
    return out


def incremental(
    dsn: str, landed: Landed, clock: Clock, n: int, repeat: int, prefix: str
) -> dict[str, list[Timing]]:
    """For each of `run` and `build`: land n new rows, then time the incremental invocation."""
    out: dict[str, list[Timing]] = {"build": [], "run": []}
    for attempt in range(repeat):
        for command in ("run", "build"):
            label = f"{prefix}inc-{n}-{command}-{attempt}"
            if n:
                land_new(dsn, landed, clock, n, label)
            out[command].append(timed(dsn, command, label, n))
    return out


def check_marts(dsn: str) -> str:
    """The marts hold one row per distinct event and per order of raw (untimed)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "select (select count(distinct event_id) from raw.order_events),"
                " (select count(*) from {a}.order_events),"
                " (select count(distinct aggregate_id) from raw.order_events),"
                " (select count(*) from {a}.order_status),"
                " (select count(*) from {a}.event_copies)"
            ).format(a=sql.Identifier(ANALYTICS_SCHEMA))
        ).fetchone()
        raw_total = conn.execute("select count(*) from raw.order_events").fetchone()[0]
    events, order_events, orders, order_status, copies = row
    ok = events == order_events and orders == order_status and copies == raw_total
    text = (
        f"{order_events:,} order_events for {events:,} distinct event ids,"
        f" {order_status:,} order_status rows for {orders:,} orders,"
        f" {copies:,} event_copies for {raw_total:,} raw rows"
    )
    if not ok:
        raise SystemExit(f"the marts do not match raw: {text}")
    return text


# -- report ---------------------------------------------------------------------------------------


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.wall_s)


def fmt_walls(timings: list[Timing]) -> str:
    if len(timings) == 1:
        return f"{timings[0].wall_s:.1f}"
    return f"{best(timings).wall_s:.1f} (of " + ", ".join(f"{t.wall_s:.1f}" for t in timings) + ")"


def node_split(timing: Timing) -> str:
    by_type = timing.seconds_by_type()
    parts = [
        f"{name} {by_type[key]:.1f}"
        for key, name in (
            ("model", "models"),
            ("test", "data tests"),
            ("unit_test", "unit tests"),
            ("seed", "seeds"),
        )
        if key in by_type
    ]
    return ", ".join(parts)


def ratio_rows(full: Timing, inc: Timing, fixed: float, command: str) -> list[tuple[str, str]]:
    ratio = inc.wall_s / full.wall_s
    net = (inc.wall_s - fixed) / (full.wall_s - fixed)
    verdict = "MET" if ratio <= TARGET_RATIO else "NOT MET"
    net_verdict = "met" if net <= TARGET_RATIO else "not met"
    return [
        (
            f"ratio `dbt {command}` incremental ({inc.new_rows:,} new) / full refresh",
            f"{ratio:.3f} = {inc.wall_s:.1f} s / {full.wall_s:.1f} s:"
            f" target <= {TARGET_RATIO} {verdict}",
        ),
        (
            f"same, without the fixed {fixed:.1f} s per invocation",
            f"{net:.3f} = {inc.wall_s - fixed:.1f} s / {full.wall_s - fixed:.1f} s ({net_verdict})",
        ),
    ]


def report(r: dict) -> tuple[list[tuple[str, str, str, str, str]], list[tuple[str, str]]]:
    """(figures table rows, summary rows)."""
    events, new = r["events"], r["new"]
    figures = []

    def add(case: str, timings: dict[str, list[Timing]]) -> None:
        build, run = best(timings["build"]), best(timings["run"])
        figures.append(
            (
                case,
                f"{build.raw_rows:,}",
                fmt_walls(timings["build"]),
                fmt_walls(timings["run"]),
                f"build: {node_split(build)}; run: {node_split(run)}",
            )
        )

    full = r["full"]
    add(f"full refresh, {events:,} rows", full)
    for n, timings in r["incremental"].items():
        add(f"incremental, {n:,} new", timings)
    if r.get("small"):
        small = r["small"]
        add(
            f"{small['events']:,}-row table: full refresh",
            small["full"],
        )
        add(f"{small['events']:,}-row table: incremental, {new:,} new", small["incremental"])

    fixed = statistics.median(r["noop_s"])
    summary = [
        (
            "fixed cost of a dbt invocation (no-op `dbt run` selecting nothing)",
            f"{fixed:.1f} s median (" + ", ".join(f"{x:.1f}" for x in r["noop_s"]) + ")",
        ),
    ]
    inc = r["incremental"][new]
    for command in ("build", "run"):
        summary += ratio_rows(best(full[command]), best(inc[command]), fixed, command)
    inc_build = best(inc["build"])
    summary.append(
        (
            f"incremental `dbt build` ({new:,} new): where the time goes",
            f"{node_split(inc_build)} node seconds (2 threads) in {inc_build.wall_s:.1f} s wall",
        )
    )
    summary.append(("marts check", r["check"]))
    if r.get("small"):
        summary.append(("marts check, small table", r["small"]["check"]))
    summary.append(("load average at end", r["load_end"]))
    return figures, summary


def node_name(node: dict) -> str:
    name = node["unique_id"].split(".", 2)[-1]
    return f"{node['type']} {name[:70]}"


def node_columns(r: dict, command: str) -> list[tuple[str, Timing]]:
    """(column title, best timing) for every case, in table order."""
    columns = [("full", best(r["full"][command]))]
    columns += [(f"+{n:,}", best(t[command])) for n, t in r["incremental"].items()]
    if r.get("small"):
        small = r["small"]
        columns += [
            (f"{small['events'] // 1000}k full", best(small["full"][command])),
            (f"{small['events'] // 1000}k +{r['new']:,}", best(small["incremental"][command])),
        ]
    return columns


def node_table(r: dict, command: str) -> tuple[list[str], list[list[str]]]:
    """Seconds per dbt node in every case: for `run` every model, for `build` the slowest nodes
    of the headline incremental build, then the sum of the other nodes."""
    columns = node_columns(r, command)
    headline = best(r["incremental"][r["new"]][command])
    ranked = sorted(headline.nodes, key=lambda n: n["seconds"], reverse=True)
    shown = ranked if command == "run" else ranked[:SLOWEST_NODES]
    shown_ids = {n["unique_id"] for n in shown}
    rows = []
    for node in shown:
        cells = []
        for _title, timing in columns:
            seconds = {n["unique_id"]: n["seconds"] for n in timing.nodes}.get(node["unique_id"])
            cells.append("-" if seconds is None else f"{seconds:.2f}")
        rows.append([node_name(node), *cells])
    if len(shown) < len(ranked):
        rest = [
            f"{sum(n['seconds'] for n in t.nodes if n['unique_id'] not in shown_ids):.2f}"
            for _title, t in columns
        ]
        rows.append([f"{len(ranked) - len(shown)} other nodes (sum)", *rest])
    rows.append(["wall time of the invocation", *(f"{t.wall_s:.2f}" for _title, t in columns)])
    return ["node", *(title for title, _t in columns)], rows


def print_text(facts: dict[str, str], r: dict) -> None:
    figures, summary = report(r)
    width = max(len(k) for k in facts)
    print()
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    print()
    header = ("case", "raw rows", "dbt build s", "dbt run s", "node seconds by type")
    widths = [max(len(str(row[i])) for row in [header, *figures]) for i in range(4)]
    for row in [header, *figures]:
        cells = [f"{row[0]:<{widths[0]}}", *(f"{row[i]:>{widths[i]}}" for i in range(1, 4))]
        print("  ".join(cells) + "  " + row[4])
    print()
    width = max(len(k) for k, _ in summary)
    for k, v in summary:
        print(f"{k:<{width}}  {v}")
    for command in ("run", "build"):
        head, rows = node_table(r, command)
        print()
        print(f"seconds per node, `dbt {command}` (columns: full refresh, then new rows):")
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        for row in [head, *rows]:
            print(
                "  ".join(
                    [
                        f"{row[0]:<{widths[0]}}",
                        *(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True)),
                    ]
                )
            )


def print_markdown(facts: dict[str, str], r: dict, command: str) -> None:
    figures, summary = report(r)
    today = dt.date.today().isoformat()
    machine = (
        f"{facts['cores (os.cpu_count)']} cores ({facts['cpu']}), {facts['memory']} RAM,"
        f" PostgreSQL {facts['postgresql server']}, dbt-core {facts['dbt-core']},"
        f" dbt-postgres {facts['dbt-postgres']}, 2 dbt threads;"
        f" load average at start {facts['load average at start']}"
    )
    print()
    print("## dbt incremental")
    print()
    print(f"Run on {today}: {machine}.")
    print()
    print(f"Command: `{command}`")
    print()
    print("| case | raw rows | `dbt build` s | `dbt run` s | node seconds by type |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in figures:
        print("| " + " | ".join(row) + " |")
    print()
    print("| measure | result |")
    print("| --- | --- |")
    for k, v in summary:
        print(f"| {k} | {v} |")
    for command_name in ("run", "build"):
        head, rows = node_table(r, command_name)
        print()
        print(f"Seconds per node, `dbt {command_name}`:")
        print()
        print("| " + " | ".join(head) + " |")
        print("| --- |" + " ---: |" * (len(head) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="raw rows modelled before (default 1000000)"
    )
    parser.add_argument(
        "--new", type=int, default=10_000, help="new events of the headline incremental run"
    )
    parser.add_argument(
        "--small-table",
        type=int,
        default=250_000,
        help="also time --new new events on a table of this many rows (0: skip; default 250000)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="incremental invocations per size, each on a fresh batch; the best is reported",
    )
    parser.add_argument("--markdown", action="store_true", help="also print a markdown block")
    parser.add_argument("--keep-stack", action="store_true", help="leave Postgres running")
    args = parser.parse_args(argv)
    if min(args.events, args.new, args.repeat) < 1 or args.small_table < 0:
        parser.error("--events, --new and --repeat must be positive, --small-table >= 0")
    return args


def start_postgres() -> Server:
    cfg = manager.StackConfig(
        home=BENCH_HOME,
        kafka_port=KAFKA_PORT,
        postgres_port=POSTGRES_PORT,
        kafka_libs=REPO / ".orderflow" / "kafka" / "libs",
    )
    log(f"starting Postgres in {BENCH_HOME} on :{POSTGRES_PORT} (no Kafka)")
    postgres = cfg.postgres_server()
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    postgres.start()
    return Server(postgres.dsn(), cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/dbt_incremental.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sizes = sorted({*EXTRA_SIZES, args.new})
    shutil.rmtree(TARGET_PATH / "runs", ignore_errors=True)
    server = start_postgres()
    run = uuid.uuid4().hex[:8]
    try:
        facts = machine_facts(server.dsn)
        r: dict = {"events": args.events, "new": args.new}

        db = f"bench_dbt_{run}"
        dsn = server.database(db)
        new_total = 2 * args.repeat * sum(sizes)
        landed = Landed(args.events + new_total)
        clock = Clock(math.ceil(args.events / RANGE_ROWS) + 2 * args.repeat * len(sizes))
        load_table(dsn, landed, clock, args.events, "base")

        # dbt parses the project again when the profile (here: the database) changes
        log("fixed cost: no-op dbt invocations (the first one parses the project, untimed)")
        dbt(dsn, "run", label="warm-up", select=NOOP_SELECT)
        r["noop_s"] = noop_seconds(dsn)
        log("  " + ", ".join(f"{x:.1f} s" for x in r["noop_s"]))

        log(f"full refresh on {args.events:,} rows")
        r["full"] = full_refresh(dsn, args.repeat, "")
        log("incremental, nothing new")
        r["incremental"] = {0: incremental(dsn, landed, clock, 0, args.repeat, "")}
        for n in sizes:
            log(f"incremental, {n:,} new")
            r["incremental"][n] = incremental(dsn, landed, clock, n, args.repeat, "")
        r["check"] = check_marts(dsn)
        r["kinds"] = dict(landed.kinds)
        log(f"  {r['check']}")
        server.drop(db)

        if args.small_table:
            log(f"small table: {args.small_table:,} rows")
            db = f"bench_dbt_{run}_small"
            dsn = server.database(db)
            landed = Landed(args.small_table + 2 * args.repeat * args.new)
            clock = Clock(math.ceil(args.small_table / RANGE_ROWS) + 2 * args.repeat)
            load_table(dsn, landed, clock, args.small_table, "small")
            # a new database is a new profile for dbt: parse again before timing anything
            dbt(dsn, "run", label="warm-up-small", select=NOOP_SELECT)
            small = {"events": args.small_table, "full": full_refresh(dsn, args.repeat, "small-")}
            small["incremental"] = incremental(dsn, landed, clock, args.new, args.repeat, "small-")
            small["check"] = check_marts(dsn)
            r["small"] = small
            server.drop(db)

        r["load_end"] = load_average()
        print_text(facts, r)
        if args.markdown:
            print_markdown(facts, r, command)
        return 0
    finally:
        for name in list(server.databases):
            with contextlib.suppress(psycopg.Error):
                server.drop(name)
        if not args.keep_stack and server.cfg is not None:
            log("stopping Postgres")
            server.cfg.postgres_server().stop()


if __name__ == "__main__":
    sys.exit(main())
