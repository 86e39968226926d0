"""`orderflow dlq list|show|replay`: look at dead letters and land them after a fix.

Replay re-validates the stored bytes with today's parser and registry. A record that now passes
is inserted into raw.order_events under its original coordinates, so replaying twice lands it
once (the primary key is the coordinates), and the dead letter is marked `replayed_at`; the audit
log gets a `replayed` row. A record that still fails stays a dead letter. Each replay also writes
one raw.replay_log row in its transaction: what the dbt sensor sees to build after a replay, as
the ledger (which a replay does not touch: its ranges stay contiguous) tells it after a landing.
The size limit is ORDERFLOW_MAX_MESSAGE_BYTES, as for landing, so a letter dead-lettered as
oversize lands once the limit is raised.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from orderflow_dagster import settings
from orderflow_dagster.land import metadata, session, store
from orderflow_dagster.land.landing import DEFAULT_MAX_MESSAGE_BYTES
from orderflow_dagster.land.parse import Event, parse_event

Coordinates = tuple[str, int, int]


def parse_coordinates(text: str) -> Coordinates:
    """`topic:partition:offset` (the topic may itself contain ':')."""
    try:
        topic, partition, offset = text.rsplit(":", 2)
        return topic, int(partition), int(offset)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected topic:partition:offset, got {text!r}") from exc


def summary(conn: psycopg.Connection, topic: str) -> list[tuple[str, int, int]]:
    """(reason, dead letters, of which replayed) by reason."""
    return conn.execute(
        "select reason, count(*), count(replayed_at) from raw.dead_letters where topic = %s"
        " group by reason order by count(*) desc, reason",
        (topic,),
    ).fetchall()


def listing(conn: psycopg.Connection, topic: str, reason: str | None, limit: int) -> list[tuple]:
    return conn.execute(
        "select kafka_partition, kafka_offset, reason, left(detail, 90), replayed_at"
        " from raw.dead_letters where topic = %s and (%s::text is null or reason = %s)"
        " order by kafka_partition, kafka_offset limit %s",
        (topic, reason, reason, limit),
    ).fetchall()


def fetch_one(conn: psycopg.Connection, coords: Coordinates) -> dict | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "select * from raw.dead_letters where topic = %s and kafka_partition = %s"
            " and kafka_offset = %s",
            coords,
        ).fetchone()


@dataclass
class ReplayReport:
    replayed: list[Coordinates] = field(default_factory=list)
    still_invalid: list[tuple[Coordinates, str, str]] = field(default_factory=list)


def replay(
    conn: psycopg.Connection,
    *,
    topic: str,
    reason: str | None = None,
    coordinates: list[Coordinates] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    run_id: str | None = None,
) -> ReplayReport:
    """Land the selected dead letters that now validate; one transaction for the whole replay."""
    run_id = run_id or f"dlq-replay-{uuid.uuid4()}"
    report = ReplayReport()
    with conn.transaction(), conn.cursor() as cur:
        # FOR UPDATE: two replays at once must not both land the same record
        rows = cur.execute(
            "select topic, kafka_partition, kafka_offset, key, value, headers, kafka_ts_ms"
            " from raw.dead_letters where topic = %s and replayed_at is null"
            " and (%s::text is null or reason = %s) order by kafka_partition, kafka_offset"
            " for update",
            (topic, reason, reason),
        ).fetchall()
        wanted = set(coordinates) if coordinates else None
        for t, p, o, key, value, headers, kafka_ts in rows:
            coords = (t, p, o)
            if wanted is not None and coords not in wanted:
                continue
            event = parse_event(
                None if value is None else bytes(value), max_bytes=max_message_bytes
            )
            if not isinstance(event, Event):
                report.still_invalid.append((coords, event.reason, event.detail))
                continue
            # key and headers as the landing stores them; headers are already in that form
            key_text, key_bytes = (None, None) if key is None else metadata.split_key(bytes(key))
            trace_id, note = event.trace_id, None
            if trace_id is None:
                trace_id, note = metadata.trace_from_headers(metadata.decode_headers(headers))
            cur.execute(
                "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
                " aggregate_id, event_type, schema_version, event_ts_ms, payload, key, headers,"
                " trace_id, kafka_ts_ms, key_bytes, metadata_note, run_id) values (%s, %s, %s, %s,"
                " %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s) on conflict do nothing",
                (
                    t,
                    p,
                    o,
                    event.event_id,
                    event.aggregate_id,
                    event.event_type,
                    event.schema_version,
                    event.timestamp_ms,
                    event.payload_json,
                    key_text,
                    None if headers is None else Jsonb(headers),
                    trace_id,
                    kafka_ts,
                    key_bytes,
                    note,
                    run_id,
                ),
            )
            cur.execute(
                "update raw.dead_letters set replayed_at = now(), replay_run_id = %s"
                " where topic = %s and kafka_partition = %s and kafka_offset = %s",
                (run_id, t, p, o),
            )
            cur.execute(
                "insert into audit.ingest_log (topic, kafka_partition, kafka_offset, event_id,"
                " outcome, reason, run_id, partition_key, trace_id)"
                " values (%s, %s, %s, %s, 'replayed', %s, %s, %s, %s)",
                (t, p, o, event.event_id, note, run_id, "dlq-replay", trace_id),
            )
            report.replayed.append(coords)
        cur.execute(
            "insert into raw.replay_log (topic, run_id, rows_replayed, still_invalid)"
            " values (%s, %s, %s, %s)",
            (topic, run_id, len(report.replayed), len(report.still_invalid)),
        )
    return report


def _connect() -> psycopg.Connection:
    conn = session.connect(settings.require("ORDERFLOW_POSTGRES_DSN"))
    store.ensure_schema(conn)
    return conn


def _run(args: argparse.Namespace) -> int:
    topic = args.topic or settings.topic()
    with _connect() as conn:
        if args.action == "list":
            for reason, count, replayed in summary(conn, topic):
                print(f"{reason:<28} {count:>8} dead letters, {replayed} replayed")
            if args.reason or args.verbose:
                for p, o, reason, detail, replayed_at in listing(
                    conn, topic, args.reason, args.limit
                ):
                    mark = " (replayed)" if replayed_at else ""
                    print(f"{topic}:{p}:{o}  {reason}{mark}  {detail}")
            return 0
        if args.action == "show":
            if not args.coordinates:
                print("dlq show needs topic:partition:offset", file=sys.stderr)
                return 2
            row = fetch_one(conn, args.coordinates[0])
            if row is None:
                print("no dead letter at those coordinates", file=sys.stderr)
                return 1
            value = bytes(row.pop("value") or b"")
            key = row.pop("key")
            for name, val in row.items():
                print(f"{name:<17} {val}")
            print(f"{'key':<17} {None if key is None else bytes(key)!r}")
            print(f"{'value':<17} {len(value)} bytes: {value[:2000]!r}")
            return 0
        if not (args.reason or args.coordinates or args.all):
            print("dlq replay needs --reason, coordinates or --all", file=sys.stderr)
            return 2
        report = replay(
            conn,
            topic=topic,
            reason=args.reason,
            coordinates=args.coordinates,
            max_message_bytes=settings.env_int(
                "ORDERFLOW_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
        )
        print(f"replayed {len(report.replayed)}; still invalid {len(report.still_invalid)}")
        for coords, reason, detail in report.still_invalid[: args.limit]:
            print(f"  {':'.join(map(str, coords))}  {reason}: {detail}")
        return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dlq", help="list, show or replay dead letters")
    parser.add_argument("action", choices=["list", "show", "replay"])
    parser.add_argument(
        "coordinates",
        nargs="*",
        type=parse_coordinates,
        help="topic:partition:offset of specific dead letters",
    )
    parser.add_argument("--reason", help="only dead letters with this reason code")
    parser.add_argument("--all", action="store_true", help="replay every unreplayed dead letter")
    parser.add_argument("--topic", help="source topic (default: ORDERFLOW_TOPIC or orders.events)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("-v", "--verbose", action="store_true", help="list individual letters")
    parser.set_defaults(func=_run)
