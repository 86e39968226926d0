"""The status changelog (outbox): what `orders.status` must carry, recorded in Postgres.

`record_changes` compares, in one transaction, the history of the orders dbt recomputed since
the last comparison (their `updated_at` stamp above the stored watermark) with the latest
changelog row of each (order_id, sequence_number), and appends:

- `transition`: a sequence number never recorded before;
- `correction`: a sequence number whose content changed, or that comes back after a retraction;
- `retraction`: a sequence number the order no longer has (a late event renumbered it away, or
  its event's winning copy moved to another order).

Running it again appends nothing. It holds dbt's incremental lock meanwhile, so it never sees a
build half-written, and the watermark moves in the same transaction as the rows it covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

KINDS = ("transition", "correction", "retraction")
# the lock dbt's incremental marts take (dbt_project/macros/serialize_incremental_runs.sql)
DBT_LOCK = "orderflow.dbt.incremental_marts"
DIFF_LOCK = "orderflow.publish.changelog"

DDL = """
create schema if not exists publish;
create table if not exists publish.status_changelog (
    changelog_seq bigserial primary key,
    order_id text not null,
    sequence_number bigint not null,
    kind text not null check (kind in ('transition', 'correction', 'retraction')),
    status text,
    previous_status text,
    event_id uuid,
    transitioned_at timestamptz,
    trace_id text,
    recorded_at timestamptz not null default clock_timestamp()
);
create index if not exists status_changelog_current
    on publish.status_changelog (order_id, sequence_number, changelog_seq desc);
create index if not exists status_changelog_event
    on publish.status_changelog (event_id);
create table if not exists publish.diff_watermark (
    id boolean primary key default true check (id),
    history_updated_at timestamptz not null
);
create or replace view publish.status_current as
    select distinct on (order_id, sequence_number) *
    from publish.status_changelog
    order by order_id, sequence_number, changelog_seq desc;
"""

# {history} and {events}: the dbt marts order_status_history and order_events
_DIFF = """
with touched as (
    select order_id, event_id from {history}
    where updated_at > %(watermark)s
),
-- an event whose winning copy moved to another order takes its transitions with it: the order
-- it left may have no row left to be touched by, so it is found through the event
changed as (
    select order_id from touched
    union
    select c.order_id from publish.status_changelog c
    join touched t on t.event_id = c.event_id and t.order_id <> c.order_id
),
history as (
    select h.order_id, h.sequence_number, h.status, h.previous_status, h.event_id,
           h.transitioned_at, e.trace_id
    from {history} h
    join changed using (order_id)
    left join {events} e on e.event_id = h.event_id
),
latest as (
    select distinct on (c.order_id, c.sequence_number) c.*
    from publish.status_changelog c
    join changed using (order_id)
    order by c.order_id, c.sequence_number, c.changelog_seq desc
),
changes as (
    select h.order_id, h.sequence_number,
           case when l.order_id is null then 'transition' else 'correction' end as kind,
           h.status, h.previous_status, h.event_id, h.transitioned_at, h.trace_id
    from history h
    left join latest l using (order_id, sequence_number)
    where l.order_id is null
       or l.kind = 'retraction'
       or (l.status, l.previous_status, l.event_id, l.transitioned_at, l.trace_id)
          is distinct from
          (h.status, h.previous_status, h.event_id, h.transitioned_at, h.trace_id)
    union all
    select l.order_id, l.sequence_number, 'retraction', null, null, null, null, null
    from latest l
    where l.kind <> 'retraction'
      and not exists (
        select 1 from history h
        where h.order_id = l.order_id and h.sequence_number = l.sequence_number
      )
)
insert into publish.status_changelog
    (order_id, sequence_number, kind, status, previous_status, event_id, transitioned_at,
     trace_id)
select order_id, sequence_number, kind, status, previous_status, event_id, transitioned_at,
       trace_id
from changes
order by order_id, sequence_number
returning kind
"""


@dataclass(frozen=True)
class Recorded:
    transitions: int = 0
    corrections: int = 0
    retractions: int = 0

    @property
    def total(self) -> int:
        return self.transitions + self.corrections + self.retractions


def ensure_schema(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (DIFF_LOCK,))
        conn.execute(DDL)


def record_changes(conn: psycopg.Connection, analytics_schema: str) -> Recorded:
    """Append what changed in order_status_history since the last call; one transaction."""
    ensure_schema(conn)
    history = sql.Identifier(analytics_schema, "order_status_history")
    events = sql.Identifier(analytics_schema, "order_events")
    with conn.transaction():
        # two diffs never interleave, and none reads a dbt build half-done
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (DIFF_LOCK,))
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (DBT_LOCK,))
        row = conn.execute(
            "select history_updated_at from publish.diff_watermark for update"
        ).fetchone()
        watermark = row[0] if row else "-infinity"
        newest = conn.execute(sql.SQL("select max(updated_at) from {}").format(history)).fetchone()[
            0
        ]
        if newest is None or (row is not None and newest <= watermark):
            return Recorded()
        kinds = conn.execute(
            sql.SQL(_DIFF).format(history=history, events=events), {"watermark": watermark}
        ).fetchall()
        conn.execute(
            "insert into publish.diff_watermark (history_updated_at) values (%s)"
            " on conflict (id) do update set history_updated_at = excluded.history_updated_at",
            (newest,),
        )
    counts = {kind: 0 for kind in KINDS}
    for (kind,) in kinds:
        counts[kind] += 1
    return Recorded(counts["transition"], counts["correction"], counts["retraction"])


def rows_after(conn: psycopg.Connection, position: int, limit: int) -> list[tuple]:
    """Changelog rows with changelog_seq above `position`, in changelog_seq order."""
    return conn.execute(
        "select changelog_seq, order_id, sequence_number, kind, status, previous_status,"
        " event_id::text, transitioned_at, trace_id"
        " from publish.status_changelog where changelog_seq > %s"
        " order by changelog_seq limit %s",
        (position, limit),
    ).fetchall()


def unpublished(conn: psycopg.Connection, position: int) -> int:
    """Changelog rows above `position`: the publish lag."""
    return conn.execute(
        "select count(*) from publish.status_changelog where changelog_seq > %s", (position,)
    ).fetchone()[0]
