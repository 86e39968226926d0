"""`orderflow backfill`: add the partitions of the ranges in a window of offsets or of time to
Dagster again, so they show in the UI and can be backfilled there.

The retention sensor (defs/retention.py) retires the partitions of landed ranges; the ledger
keeps every range. This command finds the planned ranges (raw.ingest_plan and the ledger's keys)
that share an offset with the window and adds their partitions to the Dagster instance of
DAGSTER_HOME. A window of time is mapped to offsets with Kafka's offsets-for-times, per
partition: from the first record at or after `--since` to the first at or after `--until`.

Re-landing a landed range lands nothing twice (the landing skips what the ledger covers, and
reports it as `already_landed`), so a backfill only re-checks the ranges. Retention keeps a
re-added partition for a whole retention from the re-adding (raw.backfill_readds).

A dry run unless `--yes`. With `--launch` too, it also submits a Dagster backfill of the
partitions, as the UI's "Materialize" dialog does; the daemon (`dagster-daemon run`, or
`dagster dev`) runs it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from confluent_kafka import TopicPartition

from orderflow_dagster import settings
from orderflow_dagster.ingest.errors import KafkaUnavailableError
from orderflow_dagster.land import kafka_source, lifecycle, lifecycle_store, session, store
from orderflow_dagster.land.landing import origin
from orderflow_dagster.land.lifecycle import PartitionLog, WindowError
from orderflow_dagster.land.planner import current_incarnation
from orderflow_dagster.land.ranges import INCARNATION_SEPARATOR, OffsetRange, kafka_topic

EXIT_REFUSED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Window:
    """Offsets [start, end) of each partition, or a time window [since, until) mapped to them."""

    from_offset: int | None = None
    to_offset: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def by_time(self) -> bool:
        return self.since is not None

    def describe(self) -> str:
        if self.by_time:
            return f"{_iso(self.since)} .. {_iso(self.until)}"
        return f"offsets {self.from_offset}..{self.to_offset}"


def _iso(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Selected:
    range: OffsetRange
    landed: bool
    in_dagster: bool


@dataclass(frozen=True)
class Selection:
    stream: str
    spans: dict[int, tuple[int, int]]  # per Kafka partition, the window's offsets
    ranges: list[Selected]

    @property
    def landed(self) -> list[Selected]:
        return [s for s in self.ranges if s.landed]

    @property
    def missing(self) -> list[Selected]:
        return [s for s in self.ranges if not s.in_dagster]


def resolve_stream(conn: psycopg.Connection, consumer, topic: str) -> str:
    """The stream a window names: `topic` itself when it names one (`<topic>@<topic id>`), else
    the stream that lands Kafka's current incarnation of the topic."""
    if INCARNATION_SEPARATOR in topic:
        return topic
    _, now = current_incarnation(conn, consumer, topic)
    return topic if now is None else now.stream


def window_spans(
    conn: psycopg.Connection, consumer, stream: str, partitions: list[int], window: Window
) -> dict[int, tuple[int, int]]:
    """Per partition, the offsets of the window (partitions where it holds nothing left out)."""
    if not window.by_time:
        return {p: (window.from_offset, window.to_offset) for p in partitions}
    kafka = kafka_topic(stream)
    _, now = current_incarnation(conn, consumer, kafka)
    if now is not None and now.stream != stream:
        raise WindowError(
            f"{stream} is not Kafka's current incarnation of {kafka}: its records are no longer "
            "in Kafka, so a time window cannot be mapped to its offsets; give offsets instead"
        )
    marks = kafka_source.watermarks(consumer, kafka, partitions)
    since_ms, until_ms = _ms(window.since), _ms(window.until)
    found = {}
    for bound, ms in (("since", since_ms), ("until", until_ms)):
        asked = [TopicPartition(kafka, p, ms) for p in partitions]
        answers = consumer.offsets_for_times(asked, timeout=10)
        failed = [tp.error for tp in answers if tp.error is not None]
        if failed:
            raise KafkaUnavailableError(failed[0])
        # -1: no record at or after that time
        found[bound] = {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in answers}
    spans = {}
    for p in partitions:
        low, high = marks[p]
        first = origin(conn, stream, p)
        log = PartitionLog(
            p,
            low,
            high,
            found["since"][p],
            found["until"][p],
            origin=first,
            below_log_ts_ms=(
                lifecycle_store.newest_stored_below(conn, stream, p, low)
                if first is not None and first < low
                else None
            ),
        )
        span = lifecycle.offsets_of_window(log, since_ms)
        if span is not None:
            spans[p] = span
    if not spans:
        logs = ", ".join(f"p{p} {low}..{high}" for p, (low, high) in sorted(marks.items()))
        raise WindowError(
            f"Kafka holds no record of {kafka} from {_iso(window.since)} to "
            f"{_iso(window.until)} (log offsets {logs}); a window before the log needs offsets "
            "(--from-offset/--to-offset), one after it has nothing to backfill"
        )
    return spans


def select(
    conn: psycopg.Connection,
    consumer,
    instance,
    topic: str,
    partitions: list[int] | None,
    window: Window,
) -> Selection:
    """The planned ranges that share an offset with the window, whether each landed and whether
    its partition is in Dagster now. Raises WindowError when the window selects nothing landed."""
    from orderflow_dagster.defs.assets import offset_ranges

    stream = resolve_stream(conn, consumer, topic)
    kafka_parts = kafka_source.partitions(consumer, kafka_topic(stream))
    parts = kafka_parts if not partitions else sorted(set(partitions))
    unknown = sorted(set(parts) - set(kafka_parts))
    if unknown:
        kafka = kafka_topic(stream)
        raise WindowError(f"{kafka} has no partition {unknown} (it has {kafka_parts})")
    spans = window_spans(conn, consumer, stream, parts, window)
    ranges: list[OffsetRange] = []
    for p, (start, end) in sorted(spans.items()):
        near = lifecycle_store.ranges_near_window(conn, stream, p, start, end)
        ranges += lifecycle.overlapping(near, start, end)
    where = ", ".join(f"p{p} {s}..{e}" for p, (s, e) in sorted(spans.items()))
    if not ranges:
        raise WindowError(
            f"nothing was planned or landed in {stream} at offsets {where}: nothing to backfill"
        )
    near_ledger = lifecycle_store.ledger_near(conn, ranges)
    landed = {r.key: lifecycle.facts_for(r.key, near_ledger[r.key]).landed for r in ranges}
    if not any(landed.values()):
        raise WindowError(
            f"none of the {len(ranges)} range(s) of {stream} at offsets {where} has landed yet: "
            "nothing to backfill (they land as usual)"
        )
    present = instance.get_existing_dynamic_partitions(offset_ranges.name, [r.key for r in ranges])
    chosen = [Selected(r, landed[r.key], r.key in present) for r in ranges]
    return Selection(stream, spans, chosen)


def readd(conn: psycopg.Connection, instance, selection: Selection, asked: str) -> list[str]:
    """Add the selection's partitions to Dagster again; the keys added. The re-add is recorded
    first, so retention never sees one of these partitions without it."""
    from orderflow_dagster.defs.assets import offset_ranges

    keys = [s.range.key for s in selection.ranges]
    with conn.transaction():
        lifecycle_store.record_readds(conn, keys, asked)
    missing = [s.range.key for s in selection.missing]
    if missing:
        instance.add_dynamic_partitions(offset_ranges.name, missing)
    return missing


def launch(instance, keys: list[str], title: str) -> str:
    """Submit a Dagster backfill of `keys` of raw_order_events, as the UI's dialog does (the
    daemon runs it); its id."""
    # Dagster's own backfill records: the public API has no call that submits an asset backfill
    # outside the UI, so this uses the constructor the webserver uses (the version is pinned)
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from orderflow_dagster.definitions import defs
    from orderflow_dagster.defs.assets import raw_order_events

    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        # the code location's graph, as the daemon that runs the backfill sees it
        asset_graph=defs.resolve_asset_graph(),
        partition_names=keys,
        asset_selection=[raw_order_events.key],
        backfill_timestamp=time.time(),
        tags={"orderflow/source": "backfill"},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=title,
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


def parse_time(text: str) -> datetime:
    """ISO-8601; a time without a zone is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def window_of(args: argparse.Namespace) -> Window:
    by_offset = args.from_offset is not None or args.to_offset is not None
    by_time = args.since is not None or args.until is not None
    if by_offset == by_time:
        raise WindowError("give a window: --from-offset and --to-offset, or --since [--until]")
    if by_offset:
        if args.from_offset is None or args.to_offset is None:
            raise WindowError("an offset window needs both --from-offset and --to-offset")
        if not 0 <= args.from_offset < args.to_offset:
            raise WindowError("--from-offset must be at least 0 and below --to-offset")
        return Window(from_offset=args.from_offset, to_offset=args.to_offset)
    if args.since is None:
        raise WindowError("a time window needs --since (--until defaults to now)")
    until = args.until or datetime.now(UTC)
    if until <= args.since:
        raise WindowError(f"--until ({_iso(until)}) must be after --since ({_iso(args.since)})")
    return Window(since=args.since, until=until)


def command_line(args: argparse.Namespace, window: Window, topic: str, *extra: str) -> str:
    parts = ["orderflow", "backfill", "--topic", topic]
    for p in args.partition or ():
        parts += ["--partition", str(p)]
    if window.by_time:
        parts += ["--since", _iso(window.since), "--until", _iso(window.until)]
    else:
        parts += ["--from-offset", str(window.from_offset), "--to-offset", str(window.to_offset)]
    return shlex.join([*parts, *extra])


def _run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from orderflow_dagster.defs.resources import retention_from_env

    topic = args.topic or settings.topic()
    try:
        window = window_of(args)
    except WindowError as exc:
        print(f"backfill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.launch and not args.yes:
        print("backfill: --launch submits a backfill, so it needs --yes", file=sys.stderr)
        return EXIT_USAGE
    if not os.environ.get("DAGSTER_HOME"):
        print(
            "backfill: DAGSTER_HOME is not set: partitions are added to the Dagster instance "
            "the UI shows, which it names",
            file=sys.stderr,
        )
        return EXIT_USAGE
    conn = session.connect(settings.require("ORDERFLOW_POSTGRES_DSN"))
    consumer = kafka_source.open_consumer(
        settings.require("ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"), settings.consumer_group()
    )
    instance = DagsterInstance.get()
    try:
        store.ensure_schema(conn)
        selection = select(conn, consumer, instance, topic, args.partition, window)
        print(
            f"window {window.describe()} of {selection.stream}: offsets "
            + ", ".join(f"p{p} {s}..{e}" for p, (s, e) in sorted(selection.spans.items()))
        )
        print(
            f"{len(selection.ranges)} range(s) overlap it, {len(selection.landed)} landed; "
            f"{len(selection.missing)} of them not in Dagster (retired)"
        )
        for s in selection.ranges:
            state = "landed" if s.landed else "not landed yet"
            where = "in Dagster" if s.in_dagster else "retired"
            print(f"  {s.range.key}  {state:<14}  {where}")
        if not args.yes:
            print("dry run: nothing changed. To add them to Dagster again, run:")
            print(f"  {command_line(args, window, topic, '--yes')}")
            return 0
        added = readd(conn, instance, selection, f"{topic} {window.describe()}")
        hours = retention_from_env().retention_hours
        print(
            f"added {len(added)} partition(s) of raw_order_events to Dagster again "
            f"({len(selection.ranges) - len(added)} were there); retention keeps all "
            f"{len(selection.ranges)} for {hours:g}h"
        )
        if args.launch:
            keys = [s.range.key for s in selection.ranges]
            backfill_id = launch(instance, keys, f"orderflow backfill {window.describe()}")
            print(
                f"submitted backfill {backfill_id} of {len(keys)} partition(s); the daemon runs "
                f"it (UI: /runs/b/{backfill_id}). Landed ranges re-land nothing (already_landed)."
            )
        else:
            print(
                "backfill them in the UI (raw_order_events > Materialize, these partitions), or "
                f"run: {command_line(args, window, topic, '--yes', '--launch')}"
            )
        return 0
    except WindowError as exc:
        print(f"backfill refused, nothing changed: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        consumer.close()
        conn.close()
        instance.dispose()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backfill",
        help="add the partitions of the ranges in a window of offsets or time to Dagster again"
        " (dry run unless --yes)",
        description="Find the planned ranges that share an offset with a window (of offsets, or "
        "of time mapped with Kafka's offsets-for-times) and add their partitions of "
        "raw_order_events to the Dagster instance of DAGSTER_HOME again, so they can be "
        "backfilled in the UI (or with --launch). Re-landing a landed range lands nothing twice.",
    )
    parser.add_argument("--topic", help="source topic, or a stream (default: ORDERFLOW_TOPIC)")
    parser.add_argument(
        "--partition",
        type=int,
        action="append",
        metavar="N",
        help="Kafka partition (may be repeated; default: every partition)",
    )
    parser.add_argument("--from-offset", type=int, help="first offset of the window")
    parser.add_argument("--to-offset", type=int, help="end of the window (exclusive)")
    parser.add_argument(
        "--since", type=parse_time, help="start of a time window (ISO-8601; no zone: UTC)"
    )
    parser.add_argument(
        "--until", type=parse_time, help="end of the time window, exclusive (default: now)"
    )
    parser.add_argument("--yes", action="store_true", help="add them (default: a dry run)")
    parser.add_argument(
        "--launch", action="store_true", help="with --yes: also submit a Dagster backfill of them"
    )
    parser.set_defaults(func=_run)
