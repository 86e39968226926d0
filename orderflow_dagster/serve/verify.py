"""`orderflow verify`: check the exactly-once invariants on a live deployment, read-only.

Checks, for the configured topic:
- every stored record (raw.order_events, raw.dead_letters) lies inside a ledger range, and each
  ledger range holds as many records as it has offsets (fewer only where Kafka itself has no
  record at an offset: transaction markers, compaction);
- no Kafka coordinates are stored twice (as an event and as an unreplayed dead letter);
- ledger ranges are contiguous per partition: no gap, no overlap;
- the consumer group's committed offsets equal the ledger ends (never ahead of Postgres);
- the audit log holds one row per stored record (landed, duplicate or replayed per event row, one
  dead_lettered per dead letter) and one `landed` row at most per event_id;
- the marts hold no event_id twice and one order_status row per order (if dbt has run);
- every raw row reached event_copies and its event_id order_events, and every order with events
  in order_events has an order_status row: as far as each model's last completed run could see
  (a build in progress, or rows landed since, are no failure).
Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orderflow_dagster import settings
from orderflow_dagster.land import kafka_source


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def ledger_gaps(spans: dict[int, list[tuple[int, int]]]) -> dict[int, list[str]]:
    """Per partition, the gaps and overlaps between consecutive ledger ranges. Pure."""
    problems: dict[int, list[str]] = {}
    for partition, ranges in spans.items():
        ordered = sorted(ranges)
        for (_s1, e1), (s2, e2) in itertools.pairwise(ordered):
            if s2 > e1:
                problems.setdefault(partition, []).append(f"gap [{e1}, {s2})")
            elif s2 < e1:
                problems.setdefault(partition, []).append(f"overlap [{s2}, {min(e1, e2)})")
    return problems


def storage_checks(conn: psycopg.Connection, topic: str) -> list[Check]:
    # a deployment whose schema predates dead-letter replay has no replayed_at column yet
    replay_aware = conn.execute(
        "select exists (select 1 from information_schema.columns where table_schema = 'raw'"
        " and table_name = 'dead_letters' and column_name = 'replayed_at')"
    ).fetchone()[0]
    unreplayed = sql.SQL("and replayed_at is null" if replay_aware else "")
    query = sql.SQL(
        """
        with stored as (
            select kafka_partition, kafka_offset from raw.order_events where topic = %(t)s
            union all
            select kafka_partition, kafka_offset from raw.dead_letters
            where topic = %(t)s {unreplayed}
        ),
        ledger as (select * from raw.ingest_ledger where topic = %(t)s)
        select
            (select count(*) from stored s where not exists (
                select 1 from ledger l where l.kafka_partition = s.kafka_partition
                and s.kafka_offset >= l.start_offset and s.kafka_offset < l.end_offset)),
            (select count(*) from ledger l where l.end_offset - l.start_offset > (
                select count(*) from stored s where s.kafka_partition = l.kafka_partition
                and s.kafka_offset >= l.start_offset and s.kafka_offset < l.end_offset)),
            (select count(*) from (select 1 from stored group by kafka_partition, kafka_offset
                having count(*) > 1) d)
        """
    ).format(unreplayed=unreplayed)
    outside, short, doubled = conn.execute(query, {"t": topic}).fetchone()
    spans: dict[int, list[tuple[int, int]]] = {}
    for p, s, e in conn.execute(
        "select kafka_partition, start_offset, end_offset from raw.ingest_ledger where topic = %s",
        (topic,),
    ):
        spans.setdefault(p, []).append((int(s), int(e)))
    gaps = ledger_gaps(spans)
    return [
        Check("records inside ledger ranges", outside == 0, f"{outside} stored outside any range"),
        Check(
            "ledger ranges complete",
            True,
            f"{short} range(s) with offsets Kafka has no record for (markers, compaction)",
        ),
        Check("no coordinates twice", doubled == 0, f"{doubled} coordinates stored twice"),
        Check(
            "ledger contiguous",
            not gaps,
            "; ".join(f"p{p}: {', '.join(v)}" for p, v in sorted(gaps.items())) or "no gap",
        ),
    ]


def audit_counts(conn: psycopg.Connection, topic: str) -> tuple[int, int, int]:
    """(event rows without exactly their audit row, dead letters likewise, event_ids with more
    than one `landed` row), all 0 on a sound deployment. Counted per topic; one full scan."""
    return conn.execute(
        """
        with audit as (
            select count(*) filter (where outcome in ('landed', 'duplicate', 'replayed')) as rows,
                   count(*) filter (where outcome = 'dead_lettered') as dead
            from audit.ingest_log where topic = %(t)s
        )
        select
            abs((select rows from audit)
                - (select count(*) from raw.order_events where topic = %(t)s)),
            abs((select dead from audit)
                - (select count(*) from raw.dead_letters where topic = %(t)s)),
            (select count(*) from (select event_id from audit.ingest_log
                                   where topic = %(t)s and outcome = 'landed'
                                   group by event_id having count(*) > 1) twice)
        """,
        {"t": topic},
    ).fetchone()


def audit_checks(conn: psycopg.Connection, topic: str) -> list[Check]:
    rows, dead, landed_twice = audit_counts(conn, topic)
    return [
        Check(
            "one audit row per record",
            rows == 0 and dead == 0,
            f"{rows} event row(s) and {dead} dead letter(s) off by their audit rows",
        ),
        Check(
            "one landed copy per event_id",
            landed_twice == 0,
            f"{landed_twice} event_id(s) audited as landed twice",
        ),
    ]


def kafka_checks(conn: psycopg.Connection, consumer, topic: str) -> tuple[list[Check], int]:
    parts = kafka_source.partitions(consumer, topic)
    committed = kafka_source.committed(consumer, topic, parts)
    marks = kafka_source.watermarks(consumer, topic, parts)
    ends = dict(
        conn.execute(
            "select kafka_partition, max(end_offset) from raw.ingest_ledger where topic = %s"
            " group by 1",
            (topic,),
        ).fetchall()
    )
    ahead = {
        p: (c, ends.get(p))
        for p, c in committed.items()
        if c is not None and c > (ends.get(p) or 0)
    }
    behind = {p: (c, ends.get(p)) for p, c in committed.items() if c != ends.get(p)}
    lag = sum(
        high - (committed[p] if committed[p] is not None else low)
        for p, (low, high) in marks.items()
    )
    return [
        Check(
            "Kafka never ahead of Postgres",
            not ahead,
            f"committed > ledger end on {ahead}" if ahead else "ok",
        ),
        Check(
            "committed offsets = ledger ends",
            not behind,
            f"differ (committed, ledger) on {behind}" if behind else "ok",
        ),
    ], lag


def mart_checks(conn: psycopg.Connection, schema: str) -> list[Check]:
    exists = conn.execute(
        "select to_regclass(%s) is not null, to_regclass(%s) is not null",
        (f"{schema}.order_events", f"{schema}.order_status"),
    ).fetchone()
    if not all(exists):
        return [Check("marts", True, f"{schema}.order_events/order_status not built yet")]
    dup_events = _keys_twice(conn, schema, "order_events", "event_id")
    dup_orders = _keys_twice(conn, schema, "order_status", "order_id")
    return [
        Check("no event_id twice in the marts", dup_events == 0, f"{dup_events} duplicated"),
        Check("one order_status row per order", dup_orders == 0, f"{dup_orders} duplicated"),
        raw_rows_reached_the_marts(conn, schema),
        orders_with_events_have_a_status(conn, schema),
    ]


def _relation_exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return conn.execute(
        "select to_regclass(format('%%I.%%I', %s::text, %s::text)) is not null", (schema, table)
    ).fetchone()[0]


def raw_rows_reached_the_marts(conn: psycopg.Connection, schema: str) -> Check:
    """Every raw row the last event_copies run could see (visible in the snapshot it recorded)
    is in event_copies, and every copy the last order_events run could see (appended before that
    run got its turn) has its event_id in order_events. Rows landed since, or a build still in
    progress, are not counted. One statement, so one snapshot of all three tables."""
    name = "every raw row reached the marts"
    if not _relation_exists(conn, schema, "event_copies"):
        return Check(name, True, "event_copies not built yet")
    if not _relation_exists(conn, schema, "incremental_runs"):
        return Check(name, True, "no dbt run recorded yet")
    query = sql.SQL(
        """
        with
        copies_read as materialized (
            select (select read_snapshot from {runs} where model = 'event_copies'
                    order by id desc limit 1) as snapshot
        ),
        events_run as materialized (
            select coalesce(
                (select started_at from {runs} where model = 'order_events'
                 order by id desc limit 1),
                (select max(transformed_at) from {order_events})
            ) as started_at
        )
        select
            (select count(*) from raw.order_events r, copies_read
             where pg_visible_in_snapshot(r.xact_id::text::xid8, copies_read.snapshot)
               and not exists (
                   select from {event_copies} c
                   where c.topic = r.topic and c.kafka_partition = r.kafka_partition
                     and c.kafka_offset = r.kafka_offset)),
            (select count(distinct c.event_id) from {event_copies} c, events_run
             where c.transformed_at < events_run.started_at
               and not exists (select from {order_events} e where e.event_id = c.event_id))
        """
    ).format(
        runs=sql.Identifier(schema, "incremental_runs"),
        event_copies=sql.Identifier(schema, "event_copies"),
        order_events=sql.Identifier(schema, "order_events"),
    )
    missing_copies, missing_events = conn.execute(query).fetchone()
    return Check(
        name,
        missing_copies == 0 and missing_events == 0,
        f"{missing_copies} raw row(s) missing from event_copies, {missing_events} event_id(s)"
        " missing from order_events",
    )


def orders_with_events_have_a_status(conn: psycopg.Connection, schema: str) -> Check:
    """Every order of the order_events rows the last order_status run could see (written before
    that run got its turn; without a recorded run, before its newest row) has an order_status
    row. One statement, so one snapshot of both tables."""
    name = "every order with events has a status"
    runs = (
        sql.SQL(
            "(select started_at from {} where model = 'order_status' order by id desc limit 1)"
        ).format(sql.Identifier(schema, "incremental_runs"))
        if _relation_exists(conn, schema, "incremental_runs")
        else sql.SQL("null::timestamptz")
    )
    query = sql.SQL(
        """
        with status_run as materialized (
            select coalesce({runs}, (select max(updated_at) from {order_status})) as started_at
        )
        select count(distinct e.order_id) from {order_events} e, status_run
        where e.transformed_at < status_run.started_at
          and not exists (select from {order_status} s where s.order_id = e.order_id)
        """
    ).format(
        runs=runs,
        order_status=sql.Identifier(schema, "order_status"),
        order_events=sql.Identifier(schema, "order_events"),
    )
    missing = conn.execute(query).fetchone()[0]
    return Check(name, missing == 0, f"{missing} order(s) with events but no order_status row")


def _keys_twice(conn: psycopg.Connection, schema: str, table: str, key: str) -> int:
    """Values of `key` held by more than one row of schema.table."""
    query = sql.SQL(
        "select count(*) from (select {key} from {table} group by 1 having count(*) > 1) d"
    ).format(key=sql.Identifier(key), table=sql.Identifier(schema, table))
    return conn.execute(query).fetchone()[0]


def verify(
    dsn: str, bootstrap: str, topic: str, group: str, schema: str
) -> tuple[list[Check], int]:
    # read-only: a read-only transaction for Postgres; Kafka is only asked, never committed to
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = on")
        consumer = kafka_source.open_consumer(bootstrap, group)
        try:
            checks = storage_checks(conn, topic) + audit_checks(conn, topic)
            k_checks, lag = kafka_checks(conn, consumer, topic)
            checks += k_checks + mart_checks(conn, schema)
        finally:
            consumer.close()
    return checks, lag


def _run(args: argparse.Namespace) -> int:
    topic = args.topic or settings.topic()
    checks, lag = verify(
        settings.require("ORDERFLOW_POSTGRES_DSN"),
        settings.require("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"),
        topic,
        settings.consumer_group(),
        os.environ.get("ORDERFLOW_ANALYTICS_SCHEMA") or "analytics",
    )
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<34} {check.detail}")
    print(f"lag   {lag} on {topic}")
    return 0 if all(c.ok for c in checks) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="check the exactly-once invariants on a live deployment (read-only)"
    )
    parser.add_argument("--topic", help="source topic (default: ORDERFLOW_TOPIC)")
    parser.set_defaults(func=_run)
