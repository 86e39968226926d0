"""Postgres side of planning and landing: schema, plan, ledger and the per-partition locks.

All SQL takes values as parameters; the few dynamic names go through `psycopg.sql.Identifier`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources

import psycopg
from psycopg.types.json import Jsonb

from orderflow_dagster.land.incarnations import Incarnation
from orderflow_dagster.land.ranges import Coverage, OffsetRange

# Advisory-lock namespaces (the first int of the two-int form), so our locks cannot collide with
# another application's locks on the same database.
LOCK_LANDING = 0x0F10
LOCK_PLANNING = 0x0F11
# taken by audit.settle_landing in sql/schema.sql, which spells it 3858
LOCK_AUDIT = 0x0F12


def schema_sql() -> str:
    return resources.files("orderflow_dagster.land").joinpath("sql/schema.sql").read_text()


def _applied(conn: psycopg.Connection, digest: str) -> bool:
    if conn.execute("select to_regclass('raw.schema_applied')").fetchone()[0] is None:
        return False
    return conn.execute(
        "select exists (select 1 from raw.schema_applied where digest = %s)", (digest,)
    ).fetchone()[0]


def ensure_schema(conn: psycopg.Connection) -> None:
    """Apply schema.sql unless this exact version was applied already.

    The check keeps DDL (and the table locks some of it takes, even when there is nothing to
    do) off the path of every connection; applying is serialized, as concurrent
    CREATE IF NOT EXISTS races.
    """
    text = schema_sql()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if _applied(conn, digest):
        return
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s, 0)", (LOCK_PLANNING,))
        if _applied(conn, digest):
            return
        conn.execute(text)
        conn.execute(
            "create table if not exists raw.schema_applied (digest text primary key,"
            " applied_at timestamptz not null default now())"
        )
        conn.execute("insert into raw.schema_applied (digest) values (%s)", (digest,))


def lock_partition_for_landing(conn: psycopg.Connection, topic: str, partition: int) -> None:
    """Serialize landings of one Kafka partition across processes (Dagster can launch duplicates).

    Held until the transaction ends. hashtext folds the topic into the key; a collision between
    two topics only serializes them, it cannot corrupt anything.
    """
    conn.execute(
        "select pg_advisory_xact_lock(%s, hashtext(%s || '|' || %s::text))",
        (LOCK_LANDING, topic, partition),
    )


def lock_topic_for_planning(conn: psycopg.Connection, topic: str) -> None:
    conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_PLANNING, topic))


def landed_spans(conn: psycopg.Connection, topic: str, partition: int) -> list[tuple[int, int]]:
    """Every ledger row of the partition, in offset order: its whole history, for checks and
    tests. What a landing or a repair needs is `spans_above_watermark`."""
    rows = conn.execute(
        "select start_offset, end_offset from raw.ingest_ledger"
        " where topic = %s and kafka_partition = %s order by start_offset",
        (topic, partition),
    ).fetchall()
    return [(int(s), int(e)) for s, e in rows]


@dataclass(frozen=True)
class Watermark:
    """raw.ingest_watermarks of one partition: where its first range starts, and the end of the
    contiguous landed prefix from there. Every offset in [origin, landed_to) is landed."""

    origin: int
    landed_to: int

    @property
    def prefix(self) -> list[tuple[int, int]]:
        """The landed prefix as one span (none while nothing landed from the origin)."""
        return [(self.origin, self.landed_to)] if self.landed_to > self.origin else []


def watermark(conn: psycopg.Connection, topic: str, partition: int) -> Watermark | None:
    """The partition's watermark; None when nothing was ever planned or landed there."""
    row = conn.execute(
        "select origin, landed_to from raw.ingest_watermarks"
        " where topic = %s and kafka_partition = %s",
        (topic, partition),
    ).fetchone()
    return None if row is None else Watermark(int(row[0]), int(row[1]))


def spans_above_watermark(
    conn: psycopg.Connection, topic: str, partition: int
) -> list[tuple[int, int]]:
    """What the partition's ledger covers, for a landing's coverage check: the landed prefix as
    one span, then the ledger rows ending past it (the few landed out of order above a gap), in
    offset order: see raw.above_watermarks. Their union is the ledger's union."""
    rows = conn.execute(
        "select origin, landed_to, start_offset, end_offset"
        " from raw.above_watermarks(%s, %s, false)",
        (topic, partition),
    ).fetchall()
    if not rows:
        return []
    mark = Watermark(int(rows[0][0]), int(rows[0][1]))
    return mark.prefix + [(int(s), int(e)) for _, _, s, e in rows if s is not None]


@dataclass(frozen=True)
class TopicProgress:
    """Plan and ledger of one topic, by Kafka partition.

    As `progress_above_watermark` reads it, `landed` starts with each partition's landed prefix
    as one span (`settled` holds its watermark) and `planned` holds only the ranges ending past
    it: every answer below is the one the whole plan and ledger would give."""

    planned: dict[int, list[OffsetRange]]
    landed: dict[int, list[tuple[int, int]]]
    settled: dict[int, Watermark] = field(default_factory=dict)

    def frontier(self, partition: int) -> int | None:
        ends = [r.end for r in self.planned.get(partition, [])]
        ends += [e for _, e in self.landed.get(partition, [])]
        if partition in self.settled:
            ends.append(self.settled[partition].landed_to)
        return max(ends) if ends else None

    def origin(self, partition: int) -> int | None:
        """Where this partition's first range started: the prefix to commit starts here."""
        if partition in self.settled:
            return self.settled[partition].origin
        starts = [r.start for r in self.planned.get(partition, [])]
        starts += [s for s, _ in self.landed.get(partition, [])]
        return min(starts) if starts else None

    def unlanded(self, partition: int | None = None) -> list[OffsetRange]:
        """Planned ranges some offset of which no ledger row covers. A range is usually landed
        as one row of its own; after a loss was acknowledged, as that row and one of the rest."""
        parts = self.planned if partition is None else {partition: self.planned.get(partition, [])}
        out = []
        for p, ranges in parts.items():
            landed = self.landed.get(p, [])
            done = set(landed)
            pending = [r for r in ranges if (r.start, r.end) not in done]
            if pending:
                covered = Coverage(landed)
                out += [r for r in pending if not covered.covers(r.start, r.end)]
        return sorted(out)

    def partitions(self) -> set[int]:
        return set(self.planned) | set(self.landed) | set(self.settled)


def topic_progress(conn: psycopg.Connection, topic: str) -> TopicProgress:
    """The whole plan and ledger of a stream: for checks and tests. Planning, the loss count of
    retired streams and ack-loss read `progress_above_watermark`, which gives the same answers."""
    planned: dict[int, list[OffsetRange]] = defaultdict(list)
    landed: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for p, s, e in conn.execute(
        "select kafka_partition, start_offset, end_offset from raw.ingest_plan"
        " where topic = %s order by kafka_partition, start_offset",
        (topic,),
    ):
        planned[p].append(OffsetRange(topic, p, int(s), int(e)))
    for p, s, e in conn.execute(
        "select kafka_partition, start_offset, end_offset from raw.ingest_ledger"
        " where topic = %s order by kafka_partition, start_offset",
        (topic,),
    ):
        landed[p].append((int(s), int(e)))
    return TopicProgress(dict(planned), dict(landed))


def progress_above_watermark(conn: psycopg.Connection, topic: str) -> TopicProgress:
    """Plan and ledger of a stream as far as they are not settled: per partition its watermark
    and the rows ending past it (raw.above_watermarks). What a sensor tick reads, whatever the
    length of the history."""
    planned: dict[int, list[OffsetRange]] = defaultdict(list)
    landed: dict[int, list[tuple[int, int]]] = defaultdict(list)
    settled: dict[int, Watermark] = {}
    for p, origin, landed_to, is_plan, s, e in conn.execute(
        "select * from raw.above_watermarks(%s, null, true)", (topic,)
    ):
        if p not in settled:
            settled[p] = Watermark(int(origin), int(landed_to))
            landed[p].extend(settled[p].prefix)
        if is_plan:
            planned[p].append(OffsetRange(topic, p, int(s), int(e)))
        elif is_plan is not None:
            landed[p].append((int(s), int(e)))
    return TopicProgress(dict(planned), {p: v for p, v in landed.items() if v}, settled)


@dataclass(frozen=True)
class RawMarkerCounts:
    """What has written raw so far, for the dbt sensor (see defs/launch.raw_marker)."""

    ledger_rows: int
    last_landed_at: datetime | None
    replays: int  # replays that landed rows
    last_replayed_at: datetime | None


def raw_marker_counts(conn: psycopg.Connection) -> RawMarkerCounts:
    """The ledger's row count and latest landing, and the replays that landed rows: from the
    counters the triggers keep (one row per partition, per topic) and the landed_at index, so
    the dbt sensor's tick reads no history. The counts equal count(*) of raw.ingest_ledger and
    of raw.replay_log's rows that landed rows, so they change with every commit of either, in
    whatever order the transactions began."""
    row = conn.execute(
        "select (select coalesce(sum(ledger_rows), 0)::bigint from raw.ingest_watermarks),"
        " (select max(landed_at) from raw.ingest_ledger),"
        " (select coalesce(sum(replays), 0)::bigint from raw.replay_totals),"
        " (select max(last_replayed_at) from raw.replay_totals)"
    ).fetchone()
    return RawMarkerCounts(int(row[0]), row[1], int(row[2]), row[3])


def record_plan(
    conn: psycopg.Connection, ranges: list[OffsetRange], topic_id: str | None = None
) -> None:
    if not ranges:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "insert into raw.ingest_plan (topic, kafka_partition, start_offset, end_offset,"
            " partition_key, topic_id) values (%s, %s, %s, %s, %s, %s) on conflict do nothing",
            [(r.topic, r.partition, r.start, r.end, r.key, topic_id) for r in ranges],
        )


@dataclass(frozen=True)
class LedgerEntry:
    range: OffsetRange
    messages_read: int
    rows_landed: int
    dead_letters: int
    already_landed: int
    run_id: str
    duration_ms: int
    # the offsets the row covers, when only part of `range` (the planned range, whose key the row
    # carries): the rest was covered before
    span: tuple[int, int] | None = None
    # the partition's log start offset seen before reading (see raw.ingest_ledger)
    log_start_offset: int | None = None
    # the operator's reason, on a row of offsets acknowledged as lost (`orderflow ack-loss`)
    acknowledged_loss: str | None = None
    # the topic id the records were read under (raw.ingest_ledger fills in the stream's own
    # when a writer gives none)
    topic_id: str | None = None


def record_landing(conn: psycopg.Connection, entry: LedgerEntry) -> None:
    r = entry.range
    start, end = entry.span or (r.start, r.end)
    conn.execute(
        "insert into raw.ingest_ledger (topic, kafka_partition, start_offset, end_offset,"
        " partition_key, messages_read, rows_landed, dead_letters, already_landed, run_id,"
        " duration_ms, log_start_offset, acknowledged_loss, topic_id)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " on conflict (topic, kafka_partition, start_offset, end_offset) do nothing",
        (
            r.topic,
            r.partition,
            start,
            end,
            r.key,
            entry.messages_read,
            entry.rows_landed,
            entry.dead_letters,
            entry.already_landed,
            entry.run_id,
            entry.duration_ms,
            entry.log_start_offset,
            entry.acknowledged_loss,
            entry.topic_id,
        ),
    )


def classification_snapshot(conn: psycopg.Connection) -> str:
    """The snapshot a landing classifies against (at the latest): taken before its first audit."""
    return conn.execute("select pg_current_snapshot()::text").fetchone()[0]


def greatest_event_id(conn: psycopg.Connection) -> str | None:
    """The greatest event_id landed so far (visible to this transaction): one step down the
    event_id index. See p_max_landed in audit.log_landing."""
    # the uuid itself, not its text: `order by event_id` would name a text output column and
    # sort a scan of the whole table instead of reading the index backwards
    row = conn.execute(
        "select event_id from raw.order_events order by event_id desc limit 1"
    ).fetchone()
    return None if row is None else str(row[0])


def settle_landing(
    conn: psycopg.Connection,
    rng: OffsetRange,
    windows: list[tuple[int, int]],
    run_id: str,
    snapshot: str,
) -> None:
    """Fail the landing (SerializationFailure) if another partition landed a copy of one of its
    events while it was classifying; see audit.settle_landing in sql/schema.sql."""
    starts, ends = [s for s, _ in windows], [e for _, e in windows]
    conn.execute(
        "select audit.settle_landing(%s, %s, %s::bigint[], %s::bigint[], %s, %s::pg_snapshot)",
        (rng.topic, rng.partition, starts, ends, run_id, snapshot),
    )


# Topic incarnations (see incarnations.py): raw.topic_incarnations in sql/schema.sql.


def incarnations(conn: psycopg.Connection, topic: str) -> list[Incarnation]:
    """The registered incarnations of a Kafka topic, oldest first."""
    return [
        Incarnation(stream, topic_id, {int(p): int(e) for p, e in (marks or {}).items()})
        for stream, topic_id, marks in conn.execute(
            "select stream, topic_id, high_watermarks from raw.topic_incarnations"
            " where topic = %s order by seq",
            (topic,),
        )
    ]


def register_incarnation(
    conn: psycopg.Connection, topic: str, topic_id: str, stream: str, reason: str
) -> Incarnation:
    """Register a stream for `topic`'s incarnation `topic_id`. Call under the topic's planning
    lock (the stream name is unique, so a race fails rather than registering twice)."""
    conn.execute(
        "insert into raw.topic_incarnations (stream, topic, topic_id, reason)"
        " values (%s, %s, %s, %s)",
        (stream, topic, topic_id, reason),
    )
    return Incarnation(stream, topic_id)


def has_ranges(conn: psycopg.Connection, stream: str) -> bool:
    return conn.execute(
        "select exists (select from raw.ingest_plan where topic = %s)"
        " or exists (select from raw.ingest_ledger where topic = %s)",
        (stream, stream),
    ).fetchone()[0]


def reassign_incarnation(conn: psycopg.Connection, stream: str, topic_id: str, reason: str) -> None:
    """Point a stream that never planned a range at another topic id (a topic re-created before
    anything was produced keeps its bare name)."""
    conn.execute(
        "update raw.topic_incarnations set topic_id = %s, reason = %s, high_watermarks = null,"
        " registered_at = now() where stream = %s",
        (topic_id, reason, stream),
    )


def record_high_watermarks(
    conn: psycopg.Connection,
    incarnation: Incarnation,
    log_ends: dict[int, int],
    reached: dict[int, int | None],
) -> None:
    """Keep the greatest log end planning saw per partition beyond what it planned (`reached`:
    the plan's frontier after this call): what a retired stream had in Kafka and never planned,
    to count its lost offsets. Planned offsets count as seen already, so a tick that planned up
    to the log end writes nothing; one writes only when a partition's unplanned end grew."""
    seen = dict(incarnation.high_watermarks)
    for p, end in log_ends.items():
        covered = reached.get(p)
        if (covered is None or end > covered) and end > seen.get(p, 0):
            seen[p] = end
    if seen != incarnation.high_watermarks:
        conn.execute(
            "update raw.topic_incarnations set high_watermarks = %s where stream = %s",
            (Jsonb({str(p): e for p, e in sorted(seen.items())}), incarnation.stream),
        )
