"""Postgres side of the partition lifecycle: narrow reads of the plan and ledger for given ranges
or windows, and the re-adds of `orderflow backfill` (raw.backfill_readds).

Every read is bounded by what it is asked about (range scans of primary keys), never by the
length of the history, so the retention sensor's tick and a backfill cost the same after a year
as after a day.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

from orderflow_dagster.land.ranges import OffsetRange

# Per range asked about: the ledger rows starting inside it, and the last one starting before it
# (which reaches into it when a row spans more than one planned range). Range scans of the
# primary key (topic, kafka_partition, start_offset, end_offset).
_LEDGER_NEAR = """
select k.key, l.start_offset, l.end_offset, extract(epoch from l.landed_at)::float8
from unnest(%(keys)s::text[], %(topics)s::text[], %(parts)s::int[], %(starts)s::bigint[],
            %(ends)s::bigint[]) as k(key, topic, part, s, e)
cross join lateral (
    (select start_offset, end_offset, landed_at from raw.ingest_ledger
     where topic = k.topic and kafka_partition = k.part
       and start_offset >= k.s and start_offset < k.e)
    union all
    (select start_offset, end_offset, landed_at from raw.ingest_ledger
     where topic = k.topic and kafka_partition = k.part and start_offset < k.s
     order by start_offset desc limit 1)
) l
"""


def ledger_near(
    conn: psycopg.Connection, ranges: Sequence[OffsetRange]
) -> dict[str, list[tuple[int, int, float]]]:
    """Per range key, the ledger rows `(start, end, landed_at as unix seconds)` that may overlap
    it (lifecycle.facts_for tells which do)."""
    out: dict[str, list[tuple[int, int, float]]] = {r.key: [] for r in ranges}
    if not ranges:
        return out
    rows = conn.execute(
        _LEDGER_NEAR,
        {
            "keys": [r.key for r in ranges],
            "topics": [r.topic for r in ranges],
            "parts": [r.partition for r in ranges],
            "starts": [r.start for r in ranges],
            "ends": [r.end for r in ranges],
        },
    ).fetchall()
    for key, start, end, landed_at in rows:
        out[key].append((int(start), int(end), float(landed_at)))
    return out


# The planned ranges and ledger rows of one partition that share an offset with [s, e): those
# starting inside the window, and the last starting before it. Ledger rows name the planned
# range they belong to (partition_key), whose key is what a backfill re-adds.
_NEAR_IN = sql.SQL(
    "(select partition_key, end_offset from {table}"
    " where topic = %(t)s and kafka_partition = %(p)s"
    " and start_offset >= %(s)s and start_offset < %(e)s)"
    " union all"
    " (select partition_key, end_offset from {table}"
    " where topic = %(t)s and kafka_partition = %(p)s and start_offset < %(s)s"
    " order by start_offset desc limit 1)"
)
_OVERLAPPING = sql.SQL(
    "with near as ({plan} union all {ledger})"
    " select distinct partition_key from near where end_offset > %(s)s"
).format(
    plan=_NEAR_IN.format(table=sql.Identifier("raw", "ingest_plan")),
    ledger=_NEAR_IN.format(table=sql.Identifier("raw", "ingest_ledger")),
)


def ranges_near_window(
    conn: psycopg.Connection, stream: str, partition: int, start: int, end: int
) -> list[OffsetRange]:
    """The planned ranges (by their keys, from the plan and the ledger) that may overlap the
    window [start, end) of one partition, sorted; lifecycle.overlapping tells which do."""
    if start >= end:
        return []
    keys = conn.execute(
        _OVERLAPPING, {"t": stream, "p": partition, "s": start, "e": end}
    ).fetchall()
    return sorted(OffsetRange.from_key(k) for (k,) in keys)


def newest_stored_below(
    conn: psycopg.Connection, stream: str, partition: int, offset: int
) -> int | None:
    """The Kafka timestamp (ms) of the newest record stored below `offset` (an event or a dead
    letter): one step down each primary key. None if there is none or it has no timestamp."""
    row = conn.execute(
        "select kafka_ts_ms from ("
        " (select kafka_offset, kafka_ts_ms from raw.order_events where topic = %(t)s"
        "  and kafka_partition = %(p)s and kafka_offset < %(o)s order by kafka_offset desc limit 1)"
        " union all"
        " (select kafka_offset, kafka_ts_ms from raw.dead_letters where topic = %(t)s"
        "  and kafka_partition = %(p)s and kafka_offset < %(o)s order by kafka_offset desc limit 1)"
        ") newest order by kafka_offset desc limit 1",
        {"t": stream, "p": partition, "o": offset},
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def readds(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, float]:
    """When `orderflow backfill` last re-added each of `keys` (unix seconds), for those it did."""
    if not keys:
        return {}
    return {
        key: float(at)
        for key, at in conn.execute(
            "select partition_key, extract(epoch from readded_at)::float8"
            " from raw.backfill_readds where partition_key = any(%s)",
            (list(keys),),
        )
    }


def record_readds(conn: psycopg.Connection, keys: Sequence[str], selection: str) -> None:
    """Note that `keys` were re-added now for a backfill of `selection` (the window asked)."""
    if not keys:
        return
    conn.execute(
        "insert into raw.backfill_readds (partition_key, selection)"
        " select k, %s from unnest(%s::text[]) k"
        " on conflict (partition_key) do update"
        " set readded_at = now(), selection = excluded.selection",
        (selection, list(keys)),
    )
