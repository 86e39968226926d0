"""`orderflow ack-loss`: record, deliberately, offsets Kafka deleted before they landed.

When retention (or DeleteRecords) removes offsets that are planned but not landed, their landing
fails loudly (OffsetsLostError) and the partition stops there: nothing can bring those records
back, and nothing may pass over them silently. This command records the loss as what it is, with
the operator's reason, so the partition can move on.

Per partition, the offsets acknowledged are exactly those
- at or past the partition's origin (where its first range starts; offsets before it were never
  the pipeline's),
- covered by no ledger row (neither landed nor acknowledged before), and
- below the partition's log start offset, asked of Kafka under the partition's landing lock:
  Kafka no longer has them. Naming an end past the log start is refused while an offset there
  still waits to land, as only what Kafka no longer has can be acknowledged.
Each run of such offsets within one planned range becomes a ledger row (`acknowledged_loss` holds
the reason, no record, messages_read 0) and each offset an audit row with outcome `lost`, all in
one transaction. The ledger stays contiguous, so the group's committed offset moves past the
acknowledged offsets at once; the rest of each range lands as usual with the next catch-up or
sensor tick, and `orderflow verify` lists the acknowledged losses apart from silent ones.

A dry run unless `--yes`: acknowledging cannot be undone (the audit log is append-only and the
group's committed offset moves on), so the command first shows exactly what it would record and
the command line that records exactly that, with each partition's end pinned, so that retention
moving on between the look and the confirmation cannot widen what is recorded.
"""

from __future__ import annotations

import argparse
import bisect
import shlex
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg

from orderflow_dagster import settings
from orderflow_dagster.land import kafka_source, session, store
from orderflow_dagster.land.landing import repair_kafka_commits
from orderflow_dagster.land.planner import current_incarnation
from orderflow_dagster.land.ranges import OffsetRange, kafka_topic, uncovered

OUTCOME_LOST = "lost"
EXIT_REFUSED = 1


class AckRefusedError(Exception):
    """The acknowledgement asked for would record offsets that are not lost: nothing recorded."""


@dataclass(frozen=True)
class Loss:
    """Offsets [start, end) of one partition that Kafka deleted before they landed."""

    range: OffsetRange  # the planned range they belong to (its key goes with the ledger row)
    start: int
    end: int
    log_start: int  # the partition's log start offset when the loss was established

    @property
    def size(self) -> int:
        return self.end - self.start

    def line(self) -> str:
        return (
            f"{self.range.topic}[{self.range.partition}] {self.start}..{self.end}  "
            f"{self.size} offset(s), of range {self.range.key}; Kafka's log starts at "
            f"{self.log_start}"
        )


def losses(
    topic: str,
    partition: int,
    planned: Sequence[OffsetRange],
    landed: Sequence[tuple[int, int]],
    log_start: int,
    until: int | None = None,
) -> list[Loss]:
    """The offsets of one partition to acknowledge, cut at planned range boundaries. Pure.

    `until` (exclusive) bounds them; one past the log start is refused (AckRefusedError) while
    an offset between the two waits to land.
    """
    starts = [r.start for r in planned] + [s for s, _ in landed]
    if not starts:
        return []  # never planned: the planner starts at the log start, nothing is missed
    origin = min(starts)
    bound = log_start if until is None else until
    if bound > log_start:
        present = uncovered(max(origin, log_start), bound, landed)
        if present:
            first, last = present[0][0], present[-1][1]
            raise AckRefusedError(
                f"offsets {first}..{last} of {topic}[{partition}] are still in Kafka (its log "
                f"starts at {log_start}); only offsets Kafka no longer has can be acknowledged "
                "as lost: land those with `orderflow catch-up`"
            )
        bound = log_start
    if bound <= origin:
        return []
    ranges = sorted(planned)
    range_starts = [r.start for r in ranges]
    out: list[Loss] = []
    for span_start, span_end in uncovered(origin, bound, landed):
        cursor = span_start
        while cursor < span_end:
            i = bisect.bisect_right(range_starts, cursor) - 1
            if i >= 0 and ranges[i].end > cursor:
                owner = ranges[i]
                end = min(span_end, owner.end)
            else:
                # past (or between) the planned ranges: a row of its own, under its own key
                following = range_starts[i + 1] if i + 1 < len(ranges) else span_end
                end = min(span_end, following)
                owner = OffsetRange(topic, partition, cursor, end)
            out.append(Loss(owner, cursor, end, log_start))
            cursor = end
    return out


def find_losses(
    conn: psycopg.Connection,
    consumer,
    topic: str,
    until: Mapping[int, int | None],
) -> list[Loss]:
    """What would be acknowledged for the partitions of `until` (all of the topic's if empty),
    read under the topic's planning lock and each partition's landing lock: call inside a
    transaction, which the locks last for.

    `topic` is a stream: the topic's bare name, or `<topic>@<topic id>` for a later incarnation
    of a re-created topic. A stream whose incarnation is no longer Kafka's current one (the topic
    was deleted and re-created) has none of its records left in Kafka: every offset it planned or
    saw and never landed is lost, as if its log started at the furthest of them."""
    kafka = kafka_topic(topic)
    retired = _retired_log_ends(conn, consumer, topic)
    parts = sorted(retired) if retired is not None else kafka_source.partitions(consumer, kafka)
    unknown = sorted(set(until) - set(parts))
    if unknown:
        raise AckRefusedError(f"{topic} has no partition {unknown} (it has {parts})")
    selected = sorted(until) if until else parts
    store.lock_topic_for_planning(conn, kafka)
    # the watermark and the rows above it: every offset below the watermark is landed, so
    # nothing there can be lost, and the ranges that can hold a loss all end above it
    progress = store.progress_above_watermark(conn, topic)
    out: list[Loss] = []
    for p in selected:
        store.lock_partition_for_landing(conn, topic, p)
        if retired is not None:
            log_start = retired[p]
        else:
            log_start = kafka_source.log_start_offset(consumer, kafka, p)
        out += losses(
            topic,
            p,
            progress.planned.get(p, []),
            store.spans_above_watermark(conn, topic, p),
            log_start,
            until.get(p),
        )
    return out


def _retired_log_ends(conn: psycopg.Connection, consumer, stream: str) -> dict[int, int] | None:
    """Per partition, the furthest offset a retired stream planned, landed or saw in Kafka; None
    when `stream` is Kafka's current incarnation (or was never registered as one)."""
    kafka = kafka_topic(stream)
    mine = next((i for i in store.incarnations(conn, kafka) if i.stream == stream), None)
    if mine is None:
        return None
    _, now = current_incarnation(conn, consumer, kafka)
    if now is not None and now.stream == stream:
        return None
    progress = store.progress_above_watermark(conn, stream)
    ends: dict[int, int] = {}
    for p in progress.partitions() | set(mine.high_watermarks):
        ends[p] = max(progress.frontier(p) or 0, mine.high_watermarks.get(p, 0))
    return ends


def record(conn: psycopg.Connection, found: Sequence[Loss], reason: str, run_id: str) -> None:
    """The ledger rows and `lost` audit rows of `found`, in the caller's transaction."""
    for loss in found:
        rng = loss.range
        whole = (loss.start, loss.end) == (rng.start, rng.end)
        store.record_landing(
            conn,
            store.LedgerEntry(
                rng,
                0,
                0,
                0,
                0,
                run_id,
                0,
                span=None if whole else (loss.start, loss.end),
                log_start_offset=loss.log_start,
                acknowledged_loss=reason,
            ),
        )
        conn.execute(
            "insert into audit.ingest_log (topic, kafka_partition, kafka_offset, event_id,"
            " outcome, reason, run_id, partition_key, trace_id)"
            " select %s, %s, o, null, %s, %s, %s, %s, null"
            " from generate_series(%s::bigint, %s::bigint - 1) o",
            (
                rng.topic,
                rng.partition,
                OUTCOME_LOST,
                reason,
                run_id,
                rng.key,
                loss.start,
                loss.end,
            ),
        )


def acknowledge(
    conn: psycopg.Connection,
    consumer,
    topic: str,
    until: Mapping[int, int | None],
    reason: str,
    *,
    dry_run: bool,
    run_id: str | None = None,
) -> list[Loss]:
    """Find the lost offsets and, unless `dry_run`, record them and move the group's committed
    offsets past them. Returns what was (or would be) acknowledged."""
    if not reason.strip():
        raise AckRefusedError("a reason is required: it is recorded with the loss")
    run_id = run_id or f"ack-loss-{uuid.uuid4()}"
    with conn.transaction():
        # each statement sees what committed before it, whatever the database's default: a
        # landing that committed while this waited for its lock must be seen as landed
        conn.execute("set transaction isolation level read committed")
        found = find_losses(conn, consumer, topic, until)
        if not dry_run:
            record(conn, found, reason, run_id)
    if dry_run:
        return found
    moved = sorted({loss.range.partition for loss in found})
    if moved:
        # only the current stream's commits move; a retired stream's ledger is history
        repair_kafka_commits(conn, consumer, topic, moved, stream=topic)
    return found


def parse_spec(text: str) -> tuple[int, int | None]:
    """`PARTITION` (every lost offset of it) or `PARTITION:END` (those below END)."""
    try:
        partition, _, end = text.partition(":")
        spec = int(partition), (int(end) if end else None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected PARTITION or PARTITION:END, got {text!r}"
        ) from exc
    if spec[0] < 0 or (spec[1] is not None and spec[1] < 0):
        raise argparse.ArgumentTypeError(f"offsets and partitions are not negative: {text!r}")
    return spec


def confirm_command(topic: str, reason: str, found: Sequence[Loss]) -> str:
    ends: dict[int, int] = {}
    for loss in found:
        ends[loss.range.partition] = max(ends.get(loss.range.partition, 0), loss.end)
    specs = " ".join(f"{p}:{end}" for p, end in sorted(ends.items()))
    return (
        f"orderflow ack-loss --topic {shlex.quote(topic)} --reason {shlex.quote(reason)} "
        f"--yes {specs}"
    )


def _run(args: argparse.Namespace) -> int:
    topic = args.topic or settings.topic()
    until: dict[int, int | None] = {}
    for partition, end in args.specs:
        if partition in until:
            print(f"ack-loss: partition {partition} named twice", file=sys.stderr)
            return 2
        until[partition] = end
    conn = session.connect(settings.require("ORDERFLOW_POSTGRES_DSN"))
    consumer = kafka_source.open_consumer(
        settings.require("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"), settings.consumer_group()
    )
    try:
        store.ensure_schema(conn)
        found = acknowledge(conn, consumer, topic, until, args.reason, dry_run=not args.yes)
        moved = sorted({loss.range.partition for loss in found})
        committed = (
            kafka_source.committed(consumer, kafka_topic(topic), moved)
            if args.yes and moved and _retired_log_ends(conn, consumer, topic) is None
            else {}
        )
    except AckRefusedError as exc:
        print(f"ack-loss refused, nothing recorded: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        consumer.close()
        conn.close()
    if not found:
        print(f"nothing to acknowledge on {topic}: no offset Kafka deleted is waiting to land")
        return 0
    total = sum(loss.size for loss in found)
    verb = "acknowledged" if args.yes else "would acknowledge"
    print(f"{verb} {total} offset(s) of {topic} as lost (deleted from Kafka before they landed):")
    for loss in found:
        print(f"  {loss.line()}")
    if not args.yes:
        print("dry run: nothing recorded. To record exactly this, run:")
        print(f"  {confirm_command(topic, args.reason, found)}")
        return 0
    print(
        "committed offsets now: "
        + ", ".join(f"p{p}={'-' if o is None else o}" for p, o in sorted(committed.items()))
    )
    print("the rest of each range lands with the next `orderflow catch-up` or sensor tick")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ack-loss",
        help="record offsets Kafka deleted before they landed as a known loss (dry run unless"
        " --yes)",
        description="Acknowledge offsets that retention deleted before they landed: writes a "
        "ledger row and one `lost` audit row per offset, with your reason, so the partition "
        "moves on. Only offsets Kafka no longer has, and that never landed, are acknowledged. "
        "Without --yes, shows what would be recorded and the exact command to record it.",
    )
    parser.add_argument(
        "specs",
        nargs="*",
        type=parse_spec,
        metavar="PARTITION[:END]",
        help="partitions to acknowledge losses of (default: every partition); with :END, only "
        "offsets below END (exclusive), refused if Kafka still has an unlanded offset below it",
    )
    parser.add_argument(
        "--reason", required=True, help="why the loss is accepted (incident, ticket); recorded"
    )
    parser.add_argument("--yes", action="store_true", help="record it (default: a dry run)")
    parser.add_argument("--topic", help="source topic (default: ORDERFLOW_TOPIC)")
    parser.set_defaults(func=_run)
