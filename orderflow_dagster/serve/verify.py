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
- topic ids match the ledger: Kafka's incarnation of the topic is the registered one, and every
  plan and ledger row carries its stream's topic id; the current stream's ledger and committed
  offsets lie within Kafka's log; no offset a re-created topic took with it is unacknowledged.
The checks of stored rows and commits run on the topic's current stream (see
land/incarnations.py). Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orderflow_dagster import settings
from orderflow_dagster.land import incarnations, kafka_source, store
from orderflow_dagster.land.planner import current_incarnation, lost_message, lost_to_recreation
from orderflow_dagster.land.ranges import INCARNATION_SEPARATOR, kafka_topic


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


def topic_checks(conn: psycopg.Connection, consumer, topic: str) -> list[Check]:
    """Kafka's topic id against the registered incarnations, the plan and the ledger."""
    topic = kafka_topic(topic)
    if not _incarnations_recorded(conn):
        return [Check("topic ids match the ledger", True, "not recorded yet (schema predates)")]
    kafka_id, now = current_incarnation(conn, consumer, topic)
    known = store.incarnations(conn, topic)
    # plan and ledger rows of the topic's streams whose topic id is not their stream's, or
    # whose stream is not registered (rows from before topic ids were recorded carry none)
    mismatched, unregistered = conn.execute(
        """
        with ranges as (
            select topic, topic_id from raw.ingest_plan
            where topic = %(t)s or starts_with(topic, %(s)s)
            union all
            select topic, topic_id from raw.ingest_ledger
            where topic = %(t)s or starts_with(topic, %(s)s)
        )
        select count(*) filter (where i.stream is not null and r.topic_id <> i.topic_id),
               count(*) filter (where i.stream is null and (r.topic <> %(t)s or %(known)s))
        from ranges r left join raw.topic_incarnations i on i.stream = r.topic
        """,
        {"t": topic, "s": f"{topic}{INCARNATION_SEPARATOR}", "known": bool(known)},
    ).fetchone()
    problems = []
    if now is None and known:
        problems.append(
            f"Kafka's {topic} has topic id {kafka_id}, but the ledger holds "
            f"{', '.join(i.topic_id for i in known)}: the topic was deleted and re-created "
            "since planning last ran (which lands the new incarnation as a stream of its own)"
        )
    if mismatched:
        problems.append(f"{mismatched} plan/ledger row(s) carry another topic id than their stream")
    if unregistered:
        problems.append(f"{unregistered} plan/ledger row(s) of unregistered streams")
    if now is None:
        detail = f"{topic}: topic id {kafka_id}, not planned since topic ids are recorded"
    else:
        detail = f"{topic}: topic id {kafka_id}, stream {now.stream}" + "".join(
            f"; retired: {i.stream} ({i.topic_id})" for i in known if i.stream != now.stream
        )

    stream = topic if now is None else now.stream
    progress = store.topic_progress(conn, stream)
    parts = kafka_source.partitions(consumer, topic)
    marks = kafka_source.watermarks(consumer, topic, parts)
    behind = [
        str(b)
        for b in incarnations.log_behind(
            {p: progress.frontier(p) for p in progress.partitions()},
            {p: high for p, (_, high) in marks.items()},
        )
    ]
    for p, (offset, owner) in sorted(kafka_source.committed_by(consumer, topic, parts).items()):
        if offset is not None and offset > marks[p][1]:
            behind.append(f"partition {p}: committed {offset}, past the log end {marks[p][1]}")
        elif offset is not None and owner is not None and owner != kafka_id:
            behind.append(f"partition {p}: committed {offset} for incarnation {owner}")
    lost = lost_to_recreation(conn, topic, None if now is None else now.stream)
    return [
        Check("topic ids match the ledger", not problems, "; ".join(problems) or detail),
        Check(
            "ledger within Kafka's log",
            not behind,
            "; ".join(behind) or f"{stream}: ledger and commits within the log on every partition",
        ),
        Check(
            "nothing lost to a re-created topic",
            not lost,
            lost_message(lost) if lost else "no retired stream left offsets unlanded",
        ),
    ]


def _incarnations_recorded(conn: psycopg.Connection) -> bool:
    return conn.execute("select to_regclass('raw.topic_incarnations') is not null").fetchone()[0]


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
    ]


def _keys_twice(conn: psycopg.Connection, schema: str, table: str, key: str) -> int:
    """Values of `key` held by more than one row of schema.table."""
    query = sql.SQL(
        "select count(*) from (select {key} from {table} group by 1 having count(*) > 1) d"
    ).format(key=sql.Identifier(key), table=sql.Identifier(schema, table))
    return conn.execute(query).fetchone()[0]


def current_stream(conn: psycopg.Connection, consumer, topic: str) -> str:
    """The stream whose rows and commits the other checks look at: the topic's current one."""
    if not _incarnations_recorded(conn):
        return topic
    _, now = current_incarnation(conn, consumer, topic)
    return topic if now is None else now.stream


def verify(
    dsn: str, bootstrap: str, topic: str, group: str, schema: str
) -> tuple[list[Check], int]:
    # read-only: a read-only transaction for Postgres; Kafka is only asked, never committed to
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = on")
        consumer = kafka_source.open_consumer(bootstrap, group)
        try:
            # the checks of stored rows and commits look at the topic's current stream (its
            # name differs from the topic's once the topic was re-created)
            kafka = topic
            topic = current_stream(conn, consumer, topic)
            checks = storage_checks(conn, topic) + audit_checks(conn, topic)
            k_checks, lag = kafka_checks(conn, consumer, topic)
            checks += k_checks + mart_checks(conn, schema)
            checks += topic_checks(conn, consumer, kafka)
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
