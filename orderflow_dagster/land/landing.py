"""Landing one offset range into Postgres: exactly once, in one transaction with its ledger row.

The order of operations is the exactly-once argument:
1. lock the Kafka partition in Postgres (advisory lock), so two runs never land it at once;
2. read the ledger under that lock and skip every offset already landed (re-landing adds nothing):
   the partition's watermark (the end of its landed prefix) and the ledger rows above it, which
   cover what the whole ledger covers;
3. stream the remaining records from Kafka and COPY them in chunks (memory stays bounded), poison
   to raw.dead_letters with its reason, never failing the batch; derive the audit rows;
4. settle against concurrent landings of other partitions (a copy of one of our events landed
   there meanwhile means: roll back and land again), insert the ledger row (one per gap, with
   the log start offset Kafka reported before the read; the partition's watermark advances
   with it, by trigger) and commit: rows, dead letters, audit rows, ledger and watermark become
   visible together;
5. only then commit to Kafka the end of the contiguous landed prefix (never past a gap).
A crash anywhere before 4 leaves nothing; a crash between 4 and 5 leaves Kafka behind, which the
next run or sensor tick repairs from the ledger (`repair_kafka_commit`).

Kafka's topic id is checked before 3 and again before the ledger row (see incarnations.py): a
range of an incarnation Kafka no longer has is refused, and since a topic id never comes back,
one seen before and after the reading means every record read came from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from confluent_kafka import Consumer, Message
from opentelemetry.trace import SpanKind

from orderflow_dagster.faults import crash_point
from orderflow_dagster.land import incarnations, kafka_source, store
from orderflow_dagster.land.incarnations import Behind, Incarnation, LogBehindLedgerError
from orderflow_dagster.land.metadata import (
    HEADERS_UNREADABLE,
    UNREADABLE_HEADERS,
    headers_json,
    read_headers,
    readable,
    split_key,
    trace_from_headers,
)
from orderflow_dagster.land.parse import (
    NULL,
    Event,
    copy_bytea,
    copy_json,
    copy_text,
    parse_event,
)
from orderflow_dagster.land.ranges import OffsetRange, kafka_topic, uncovered
from orderflow_dagster.tracing import tracer

EVENT_COLUMNS = (
    "topic, kafka_partition, kafka_offset, event_id, aggregate_id, event_type, schema_version,"
    " event_ts_ms, payload, key, headers, trace_id, kafka_ts_ms, key_bytes, metadata_note, run_id"
)
DEAD_LETTER_COLUMNS = (
    "topic, kafka_partition, kafka_offset, key, value, headers, reason, detail, kafka_ts_ms, run_id"
)
COPY_EVENTS = f"copy raw.order_events ({EVENT_COLUMNS}) from stdin"
COPY_DEAD_LETTERS = f"copy raw.dead_letters ({DEAD_LETTER_COLUMNS}) from stdin"

NIL_UUID = "00000000-0000-0000-0000-000000000000"  # below every other uuid
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
DEFAULT_CHUNK_ROWS = 5_000
MAX_SETTLE_ATTEMPTS = 5


@dataclass(frozen=True)
class LandingResult:
    range: OffsetRange
    messages_read: int
    rows_landed: int
    dead_letters: int
    already_landed: int
    duration_s: float
    committed_offset: int | None  # what Kafka's consumer group holds for the partition afterwards
    high_watermark: int | None

    @property
    def events_per_second(self) -> float:
        return self.messages_read / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def lag_after(self) -> int | None:
        if self.high_watermark is None or self.committed_offset is None:
            return None
        return max(0, self.high_watermark - self.committed_offset)


class _Batch:
    """Builds COPY lines: events for the open COPY stream, dead letters buffered beside it."""

    def __init__(self, rng: OffsetRange, run_id: str, max_message_bytes: int) -> None:
        self.prefix = f"{copy_text(rng.topic)}\t{rng.partition}\t"
        self.suffix = f"\t{copy_text(run_id)}\n"
        # key_bytes and metadata_note, both null in the usual case
        self.clean_suffix = f"\t{NULL}\t{NULL}{self.suffix}"
        self.max_message_bytes = max_message_bytes
        self.events: list[str] = []
        self.dead: list[str] = []
        self.rows = 0  # event rows handed to COPY so far
        # of the current gap: the greatest event_id landed before it, and how many of its event
        # rows have a greater one (see audit.log_landing's p_max_landed)
        self.max_landed = NIL_UUID
        self.gap_rows = self.gap_rows_above = 0

    def start_gap(self, max_landed: str | None) -> None:
        self.max_landed = max_landed or NIL_UUID
        self.gap_rows = self.gap_rows_above = 0

    def gap_mostly_above(self) -> bool:
        """Whether most of this gap's ids are above the greatest id landed before it: then the
        audit skips the probe for those (a mixed-case id may be misjudged here: that costs
        speed, never correctness, as the database compares the uuids themselves)."""
        return self.gap_rows_above * 2 > self.gap_rows

    def add(self, msg: Message) -> None:
        event = parse_event(msg.value(), max_bytes=self.max_message_bytes)
        key = msg.key()
        try:
            headers = read_headers(msg)  # never msg.headers(): see metadata.read_headers
            note = None
        except UNREADABLE_HEADERS:
            headers, note = None, HEADERS_UNREADABLE
        ts_type, ts = msg.timestamp()
        kafka_ts = str(ts) if ts_type and ts >= 0 else NULL
        headers_text = copy_json(headers_json(headers)) if headers else NULL
        if type(event) is Event:
            self.gap_rows += 1
            if event.event_id > self.max_landed:
                self.gap_rows_above += 1
            aggregate = copy_text(event.aggregate_id)
            key_raw = None
            if key is None:
                key_text = NULL
            elif key == event.aggregate_id.encode():
                key_text = aggregate  # the usual case: keyed by order
            else:
                text, key_raw = split_key(key)
                key_text = copy_text(text)
            trace_id = event.trace_id  # the envelope's own wins
            if trace_id is None and headers:
                trace_id, note = trace_from_headers(headers)
            suffix = (
                self.clean_suffix
                if key_raw is None and note is None
                else f"\t{copy_bytea(key_raw)}\t{copy_text(note)}{self.suffix}"
            )
            self.events.append(
                f"{self.prefix}{msg.offset()}\t{event.event_id}\t{aggregate}"
                f"\t{event.event_type}\t{event.schema_version}\t{event.timestamp_ms}"
                f"\t{copy_json(event.payload_json)}\t{key_text}\t{headers_text}"
                f"\t{copy_text(trace_id)}\t{kafka_ts}{suffix}"
            )
        else:
            detail = event.detail if note is None else f"{event.detail} ({note})"
            detail = readable(detail.encode("utf-8", "surrogatepass"))
            self.dead.append(
                f"{self.prefix}{msg.offset()}\t{copy_bytea(key)}\t{copy_bytea(msg.value())}"
                f"\t{headers_text}\t{event.reason}\t{copy_text(detail)}\t{kafka_ts}{self.suffix}"
            )

    def take_events(self) -> str:
        text = "".join(self.events)
        self.rows += len(self.events)
        self.events.clear()
        return text

    def flush_dead(self, cur: psycopg.Cursor) -> int:
        count = len(self.dead)
        if count:
            with cur.copy(COPY_DEAD_LETTERS) as copy:
                copy.write("".join(self.dead))
            self.dead.clear()
        return count


def land_range(
    rng: OffsetRange,
    *,
    conn: psycopg.Connection,
    consumer: Consumer,
    run_id: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    idle_timeout: float = 60.0,
) -> LandingResult:
    """Land `rng` and then commit Kafka's offsets. Safe to call any number of times."""
    with tracer.start_as_current_span(
        "orderflow.land_range",
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.destination.name": rng.topic,
            "messaging.kafka.partition": rng.partition,
            "orderflow.range": rng.key,
        },
    ) as span:
        for attempt in range(1, MAX_SETTLE_ATTEMPTS + 1):
            try:
                result = _land_range(
                    rng, conn, consumer, run_id, max_message_bytes, chunk_rows, idle_timeout
                )
                break
            except psycopg.errors.SerializationFailure:
                # another partition landed a copy of one of these events meanwhile (see
                # audit.settle_landing): nothing was written; landing again sees that copy
                if attempt == MAX_SETTLE_ATTEMPTS:
                    raise
                span.add_event("orderflow.land_range.retry", {"attempt": attempt})
        span.set_attributes(
            {
                "orderflow.rows_landed": result.rows_landed,
                "orderflow.dead_letters": result.dead_letters,
            }
        )
        return result


def _land_range(
    rng: OffsetRange,
    conn: psycopg.Connection,
    consumer: Consumer,
    run_id: str,
    max_message_bytes: int,
    chunk_rows: int,
    idle_timeout: float,
) -> LandingResult:
    started = time.monotonic()
    messages = rows = dead = 0
    topic_id = None
    if not store.incarnations(conn, kafka_topic(rng.topic)):
        from orderflow_dagster.land.planner import register_current

        register_current(conn, consumer, kafka_topic(rng.topic))
    with conn.transaction():
        store.lock_partition_for_landing(conn, rng.topic, rng.partition)
        # the landed prefix and the few rows above it: what the whole ledger covers
        spans = store.spans_above_watermark(conn, rng.topic, rng.partition)
        gaps = [] if (rng.start, rng.end) in spans else uncovered(rng.start, rng.end, spans)
        already = rng.size - sum(e - s for s, e in gaps)
        if gaps:
            topic_id = _current_topic_id(conn, consumer, rng)
            # before the first fetch: an offset below it that does not land was deleted before
            # it could be read, one above it was read through (a marker); see verify
            log_start = kafka_source.log_start_offset(
                consumer, kafka_topic(rng.topic), rng.partition
            )
            snapshot = store.classification_snapshot(conn)
            crash_point("before_copy")
            counts = _stream_gaps(
                cur_conn=conn,
                consumer=consumer,
                rng=rng,
                gaps=gaps,
                run_id=run_id,
                max_message_bytes=max_message_bytes,
                chunk_rows=chunk_rows,
                idle_timeout=idle_timeout,
            )
            store.settle_landing(conn, rng, gaps, run_id, snapshot)
            _current_topic_id(conn, consumer, rng)  # raises if the topic was re-created meanwhile
            duration_ms = int((time.monotonic() - started) * 1000)
            # a row per gap, so the ledger never overlaps itself where part of the range was
            # covered before (an acknowledged loss); usually the one gap is the whole range
            for gap, (gap_messages, gap_rows, gap_dead) in zip(gaps, counts, strict=True):
                store.record_landing(
                    conn,
                    store.LedgerEntry(
                        rng,
                        gap_messages,
                        gap_rows,
                        gap_dead,
                        0,
                        run_id,
                        duration_ms,
                        span=None if gap == (rng.start, rng.end) else gap,
                        log_start_offset=log_start,
                        topic_id=topic_id,
                    ),
                )
            messages, rows, dead = map(sum, zip(*counts, strict=True))
            crash_point("after_copy_before_commit")
    crash_point("after_db_commit_before_kafka_commit")
    # the log end this consumer's fetches just saw, when it read anything (else asked afresh)
    marks = consumer.get_watermark_offsets(
        kafka_source.TopicPartition(kafka_topic(rng.topic), rng.partition), cached=True
    )
    known = marks if marks and marks[0] >= 0 and marks[1] >= 0 else None
    committed = repair_kafka_commits(
        conn,
        consumer,
        rng.topic,
        [rng.partition],
        topic_id=topic_id,
        marks=None if known is None else {rng.partition: (int(known[0]), int(known[1]))},
        stream=rng.topic,
    )[rng.partition]
    crash_point("after_kafka_commit")
    return LandingResult(
        rng,
        messages,
        rows,
        dead,
        already,
        time.monotonic() - started,
        committed,
        int(known[1]) if known else None,
    )


def _current_topic_id(conn: psycopg.Connection, consumer: Consumer, rng: OffsetRange) -> str:
    """Kafka's topic id, when `rng` belongs to the stream that lands Kafka's current incarnation
    of its topic; raises TopicRecreatedError (or another IncarnationError) otherwise."""
    topic = kafka_topic(rng.topic)
    known = store.incarnations(conn, topic)
    kafka_id = kafka_source.topic_id(consumer, topic)
    incarnations.refuse_retired(f"range {rng}", rng.topic, known, kafka_id)
    return kafka_id


def _stream_gaps(
    *,
    cur_conn: psycopg.Connection,
    consumer: Consumer,
    rng: OffsetRange,
    gaps: list[tuple[int, int]],
    run_id: str,
    max_message_bytes: int,
    chunk_rows: int,
    idle_timeout: float,
) -> list[tuple[int, int, int]]:
    """COPY the records of `gaps` in one streaming COPY per gap, so that Postgres ingests one
    chunk while Python parses the next (a COPY statement per chunk would make them take turns),
    then write the gap's audit rows. (Running the audit per chunk, from a helper thread, while
    Python parses on, measured slower on 2 cores: see docs/benchmarks.md.)

    Dead letters cannot share the stream; they are buffered and written between COPYs, the
    stream being closed and reopened whenever the buffer reaches `chunk_rows`, so memory stays
    bounded even for a range of nothing but poison. Returns (messages, rows, dead letters) per
    gap.
    """
    messages = dead = 0
    counts: list[tuple[int, int, int]] = []
    batch = _Batch(rng, run_id, max_message_bytes)
    with cur_conn.cursor() as cur:
        for start, end in gaps:
            before = (messages, batch.rows, dead)
            # after the classification snapshot and before this gap's rows (see audit.log_landing)
            batch.start_gap(store.greatest_event_id(cur_conn))
            spans = kafka_source.read_span(
                consumer, rng.topic, rng.partition, start, end, idle_timeout=idle_timeout
            )
            exhausted = False
            while not exhausted:
                with cur.copy(COPY_EVENTS) as copy:
                    for msgs in spans:
                        for msg in msgs:
                            batch.add(msg)
                        messages += len(msgs)
                        copy.write(batch.take_events())
                        crash_point("mid_copy")
                        if len(batch.dead) >= chunk_rows:
                            break
                    else:
                        exhausted = True
                dead += batch.flush_dead(cur)
            # the audit log, one row per record, derived in the database from what was just
            # written (no second stream of Python-formatted lines on the hot path); each gap
            # right after its rows, as audit.log_landing expects
            window = {
                "topic": rng.topic,
                "partition": rng.partition,
                "start": start,
                "end": end,
                "run_id": run_id,
                "key": rng.key,
                "max_landed": batch.max_landed if batch.gap_mostly_above() else None,
            }
            cur.execute(AUDIT_FROM_LANDING, window)
            counts.append((messages - before[0], batch.rows - before[1], dead - before[2]))
    return counts


# see audit.log_landing in sql/schema.sql
AUDIT_FROM_LANDING = (
    "select audit.log_landing(%(topic)s, %(partition)s, %(start)s, %(end)s, %(run_id)s, %(key)s,"
    " %(max_landed)s::uuid)"
)


def origin(conn: psycopg.Connection, topic: str, partition: int) -> int | None:
    """Where the partition's first range starts (None if nothing was planned there)."""
    mark = store.watermark(conn, topic, partition)
    return None if mark is None else mark.origin


def repair_kafka_commit(
    conn: psycopg.Connection, consumer: Consumer, topic: str, partition: int
) -> int | None:
    """`repair_kafka_commits` of one partition; returns the committed offset afterwards."""
    return repair_kafka_commits(conn, consumer, topic, [partition])[partition]


def repair_kafka_commits(
    conn: psycopg.Connection,
    consumer: Consumer,
    topic: str,
    partitions: list[int] | None = None,
    *,
    topic_id: str | None = None,
    marks: dict[int, tuple[int, int]] | None = None,
    stream: str | None = None,
) -> dict[int, int | None]:
    """Move the group's committed offsets up to the end of the landed prefix, never past a gap:
    what each tick and catch-up run does, so a process that died between the two commits is
    repaired on the next one. Returns the committed offsets afterwards.

    Only the commits of the Kafka topic's current stream are repaired (a retired stream's
    ledger describes a log Kafka no longer has), never past Kafka's log end (LogBehindLedgerError
    instead), and tagged with the topic id. A committed offset that is no position of the landed
    prefix (committed for another incarnation, or past the log end) is replaced by the ledger's.
    `topic_id` and `marks`: what the caller just read from Kafka, to save asking again.
    `stream`: repair only if it is the current stream (else None per partition).
    """
    kafka = kafka_topic(topic)
    if topic_id is None:
        topic_id = kafka_source.topic_id(consumer, kafka)
    inc = incarnations.current(store.incarnations(conn, kafka), topic_id)
    parts = kafka_source.partitions(consumer, kafka) if partitions is None else partitions
    if stream is not None and (inc is None or inc.stream != stream):
        # a range of a retired stream that had landed already: its commits are history
        return dict.fromkeys(parts)
    if inc is None:
        # planning has not registered this incarnation yet: nothing of it landed
        return kafka_source.committed(consumer, kafka, parts)
    missing = [p for p in parts if marks is None or p not in marks]
    marks = {**(marks or {}), **kafka_source.watermarks(consumer, kafka, missing)}
    return {p: _repair_partition(conn, consumer, inc, p, marks[p]) for p in parts}


def _repair_partition(
    conn: psycopg.Connection,
    consumer: Consumer,
    inc: Incarnation,
    partition: int,
    marks: tuple[int, int],
) -> int | None:
    """Runs under the partition's landing lock so concurrent runs commit in order and the offset
    never moves backwards (unless it was none of this log's)."""
    low, log_end = marks
    with conn.transaction():
        store.lock_partition_for_landing(conn, inc.stream, partition)
        # the watermark is the end of the landed prefix, kept with every ledger row: the
        # repair reads one row, whatever the history
        mark = store.watermark(conn, inc.stream, partition)
        start, target = (None, None) if mark is None else (mark.origin, mark.landed_to)
        if target is not None and target > log_end:
            behind = [Behind(partition, log_end, target)]
            raise LogBehindLedgerError(inc.stream, inc.topic_id, behind)
        current, owner = kafka_source.committed_by(consumer, inc.stream, [partition])[partition]
        # commits untagged are older orderflow's (or another tool's): the bare stream's own
        ours = owner == inc.topic_id or (owner is None and inc.stream == inc.topic)
        if current is not None and (not ours or current > log_end):
            replacement = target if target is not None else (start if start is not None else low)
            crash_point("in_kafka_commit")
            kafka_source.commit(consumer, inc.stream, {partition: replacement}, inc.topic_id)
            return replacement
        # nothing landed from the origin yet: leave the group without a commit rather than
        # commit the origin itself, so "committed" always means "landed up to here"
        floor = current if current is not None else start
        if target is not None and target > floor:
            crash_point("in_kafka_commit")
            kafka_source.commit(consumer, inc.stream, {partition: target}, inc.topic_id)
            return target
        return current
