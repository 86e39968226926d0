"""`orderflow verify`: check the exactly-once invariants on a live deployment, read-only.

Checks, for the configured topic:
- every stored record (raw.order_events, raw.dead_letters) lies inside a ledger range, and each
  ledger range holds every record it landed and a record at every offset below the log start
  (low watermark) its landing saw; a missing offset at or above it held no record in Kafka
  (a transaction marker, compaction);
- no range lost records silently: offsets deleted by retention before they landed are
  acknowledged losses (`orderflow ack-loss`), each sound: Kafka no longer had them, no record is
  stored there, and each has exactly one `lost` audit row;
- no Kafka coordinates are stored twice (as an event and as an unreplayed dead letter);
- ledger ranges are contiguous per partition: no gap, no overlap;
- the consumer group's committed offsets equal the ledger ends (never ahead of Postgres);
- the audit log holds one row per stored record (landed, duplicate or replayed per event row, one
  dead_lettered per dead letter) and one `landed` row at most per event_id;
- the marts hold no event_id twice and one order_status row per order (if dbt has run; both
  marts or neither);
- every raw row reached event_copies and its event_id order_events, and every order with events
  in order_events has an order_status row: as far as each model's last completed run could see
  (a build in progress, or rows landed since, are no failure);
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
from orderflow_dagster.land import incarnations, kafka_source, session, store
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


def _has_column(conn: psycopg.Connection, table: str, column: str) -> bool:
    """Whether raw.`table` has `column`: verify reads deployments whose schema is older."""
    return conn.execute(
        "select exists (select 1 from information_schema.columns where table_schema = 'raw'"
        " and table_name = %s and column_name = %s)",
        (table, column),
    ).fetchone()[0]


def _ledger_columns(conn: psycopg.Connection) -> sql.Composable:
    """The ledger's log start and acknowledgement columns, as nulls where they do not exist."""
    log_start = sql.SQL(
        "log_start_offset"
        if _has_column(conn, "ingest_ledger", "log_start_offset")
        else "null::bigint"
    )
    ack = sql.SQL(
        "acknowledged_loss"
        if _has_column(conn, "ingest_ledger", "acknowledged_loss")
        else "null::text"
    )
    return sql.SQL("{} as log_start, {} as ack").format(log_start, ack)


# Per ledger row: its offsets, the log start the landing saw (its start where unknown: nothing
# is judged below it), and how many records it holds, in all and below that log start. Each
# count is a range scan of a primary key.
_LEDGER_HOLDINGS = """
with ledger as (
    select kafka_partition, start_offset, end_offset, rows_landed + dead_letters as accounted,
           {columns}
    from raw.ingest_ledger where topic = %(t)s
),
held as (
    select l.*,
           greatest(0, least(l.end_offset, coalesce(l.log_start, l.start_offset))
                       - l.start_offset) as below,
           h.stored, h.stored_below
    from ledger l
    cross join lateral (
        select count(*) as stored,
               count(*) filter (where x.kafka_offset < l.log_start) as stored_below
        from (
            select kafka_offset from raw.order_events o
            where o.topic = %(t)s and o.kafka_partition = l.kafka_partition
              and o.kafka_offset >= l.start_offset and o.kafka_offset < l.end_offset
            union all
            select kafka_offset from raw.dead_letters d
            where d.topic = %(t)s and d.kafka_partition = l.kafka_partition
              and d.kafka_offset >= l.start_offset and d.kafka_offset < l.end_offset
              {unreplayed}
        ) x
    ) h
)
select
    count(*) filter (where ack is null and stored < accounted),
    count(*) filter (where ack is null and stored_below < below),
    coalesce(sum(below - stored_below) filter (where ack is null), 0),
    coalesce(sum((end_offset - start_offset - below) - (stored - stored_below))
             filter (where ack is null), 0),
    count(*) filter (where ack is null and log_start is null),
    -- the ranges that lost records, and the acknowledged losses with whether each is unsound
    coalesce(json_agg(json_build_array(
                 kafka_partition, start_offset, end_offset, ack,
                 ack is not null and (log_start is null or log_start < end_offset or stored > 0))
             order by kafka_partition, start_offset)
             filter (where (ack is null and stored_below < below) or ack is not null), '[]')
from held
"""


@dataclass(frozen=True)
class LedgerHoldings:
    """What the ledger's ranges hold (see _LEDGER_HOLDINGS), for the storage and loss checks."""

    short: int  # landing ranges holding fewer records than they landed
    lossy: int  # landing ranges missing offsets below the log start they saw
    lost: int  # those offsets
    unheld: int  # offsets at or above it with no record (markers, compaction)
    unjudged: int  # ranges landed before log starts were recorded
    # (partition, start, end, acknowledged reason or None, unsound acknowledgement)
    flagged: list[tuple[int, int, int, str | None, bool]]


def ledger_holdings(conn: psycopg.Connection, topic: str) -> LedgerHoldings:
    query = sql.SQL(_LEDGER_HOLDINGS).format(
        columns=_ledger_columns(conn), unreplayed=_unreplayed(conn)
    )
    *counts, flagged = conn.execute(query, {"t": topic}).fetchone()
    return LedgerHoldings(*counts, flagged=[tuple(row) for row in flagged])


def _unreplayed(conn: psycopg.Connection) -> sql.Composable:
    # a deployment whose schema predates dead-letter replay has no replayed_at column yet
    replay_aware = _has_column(conn, "dead_letters", "replayed_at")
    return sql.SQL("and replayed_at is null" if replay_aware else "")


def storage_checks(
    conn: psycopg.Connection, topic: str, holdings: LedgerHoldings | None = None
) -> list[Check]:
    unreplayed = _unreplayed(conn)
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
            (select count(*) from (select 1 from stored group by kafka_partition, kafka_offset
                having count(*) > 1) d)
        """
    ).format(unreplayed=unreplayed)
    outside, doubled = conn.execute(query, {"t": topic}).fetchone()
    held = holdings or ledger_holdings(conn, topic)
    short, lossy, lost = held.short, held.lossy, held.lost
    spans: dict[int, list[tuple[int, int]]] = {}
    for p, s, e in conn.execute(
        "select kafka_partition, start_offset, end_offset from raw.ingest_ledger where topic = %s",
        (topic,),
    ):
        spans.setdefault(p, []).append((int(s), int(e)))
    gaps = ledger_gaps(spans)
    if short or lossy:
        complete = (
            f"{short} range(s) hold fewer records than they landed; {lossy} range(s) miss"
            f" {lost} offset(s) below the log start their landing saw (lost to retention)"
        )
    else:
        complete = (
            f"{held.unheld} offset(s) Kafka had no record at (transaction markers, compaction)"
        )
        if held.unjudged:
            complete += f"; {held.unjudged} range(s) landed before log starts were recorded"
    return [
        Check("records inside ledger ranges", outside == 0, f"{outside} stored outside any range"),
        Check("ledger ranges complete", short == 0 and lossy == 0, complete),
        Check("no coordinates twice", doubled == 0, f"{doubled} coordinates stored twice"),
        Check(
            "ledger contiguous",
            not gaps,
            "; ".join(f"p{p}: {', '.join(v)}" for p, v in sorted(gaps.items())) or "no gap",
        ),
    ]


@dataclass(frozen=True)
class AcknowledgedLoss:
    partition: int
    start: int
    end: int
    reason: str


def loss_checks(
    conn: psycopg.Connection, topic: str, holdings: LedgerHoldings | None = None
) -> list[Check]:
    """No range lost records silently: every offset a landed range misses below the log start
    its landing saw is acknowledged (`orderflow ack-loss`), and every acknowledgement is sound:
    Kafka no longer had its offsets, it holds no record, and each of its offsets has exactly
    one `lost` audit row."""
    held = holdings or ledger_holdings(conn, topic)
    silent: list[str] = []
    unsound: list[str] = []
    acknowledged: list[AcknowledgedLoss] = []
    for p, s, e, reason, bad in held.flagged:
        if reason is None:
            silent.append(f"p{p} [{s}, {e})")
        else:
            acknowledged.append(AcknowledgedLoss(p, int(s), int(e), reason))
            if bad:
                unsound.append(f"p{p} [{s}, {e})")
    # one scan of the audit log for its `lost` rows, each matched to an acknowledged range
    audit_ok, audited = conn.execute(
        """
        with lost as (
            select kafka_partition, kafka_offset, count(*) as n from audit.ingest_log
            where topic = %(t)s and outcome = 'lost' group by 1, 2
        ),
        acks as (
            select * from unnest(%(p)s::int[], %(s)s::bigint[], %(e)s::bigint[])
                as a(kafka_partition, start_offset, end_offset)
        )
        select count(*) filter (where n = 1 and exists (
                   select 1 from acks a where a.kafka_partition = l.kafka_partition
                   and l.kafka_offset >= a.start_offset and l.kafka_offset < a.end_offset)),
               count(*)
        from lost l
        """,
        {
            "t": topic,
            "p": [a.partition for a in acknowledged],
            "s": [a.start for a in acknowledged],
            "e": [a.end for a in acknowledged],
        },
    ).fetchone()
    offsets = sum(a.end - a.start for a in acknowledged)
    audit_sound = audit_ok == offsets == audited
    problems = []
    if silent:
        problems.append(f"records lost below the log start seen at landing in {', '.join(silent)}")
    if unsound:
        problems.append(
            f"acknowledged as lost though Kafka still had them, or holding records:"
            f" {', '.join(unsound)}"
        )
    if not audit_sound:
        problems.append(
            f"{offsets} acknowledged offset(s) but {audit_ok} with exactly their one `lost`"
            f" audit row, of {audited} audited as lost"
        )
    if problems:
        detail = "; ".join(problems)
    elif acknowledged:
        shown = ", ".join(
            f"p{a.partition} [{a.start}, {a.end}) ({a.reason})" for a in acknowledged[:5]
        )
        more = f" and {len(acknowledged) - 5} more" if len(acknowledged) > 5 else ""
        detail = f"none; {offsets} offset(s) acknowledged as lost: {shown}{more}"
    else:
        detail = "none, and none acknowledged"
    return [Check("no range lost records silently", not problems, detail)]


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
    if not any(exists):
        return [Check("marts", True, f"{schema}.order_events/order_status not built yet")]
    if not all(exists):
        # the first build stopped halfway: the marts that exist are not to be trusted either
        missing = "order_events" if not exists[0] else "order_status"
        return [Check("marts", False, f"{schema}.{missing} missing beside the other mart")]
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


def current_stream(conn: psycopg.Connection, consumer, topic: str) -> str:
    """The stream whose rows and commits the other checks look at: the topic's current one."""
    if not _incarnations_recorded(conn):
        return topic
    _, now = current_incarnation(conn, consumer, topic)
    return topic if now is None else now.stream


def verify(
    dsn: str, bootstrap: str, topic: str, group: str, schema: str
) -> tuple[list[Check], int]:
    # read-only: a read-only session for Postgres; Kafka is only asked, never committed to
    with session.connect(dsn, read_only=True) as conn:
        consumer = kafka_source.open_consumer(bootstrap, group)
        try:
            # the checks of stored rows and commits look at the topic's current stream (its
            # name differs from the topic's once the topic was re-created)
            kafka = topic
            topic = current_stream(conn, consumer, topic)
            held = ledger_holdings(conn, topic)
            checks = (
                storage_checks(conn, topic, held)
                + loss_checks(conn, topic, held)
                + audit_checks(conn, topic)
            )
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
