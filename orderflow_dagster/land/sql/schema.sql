-- The landing zone. Applied idempotently by `orderflow_dagster.land.schema.ensure_schema`.
-- One row per Kafka record that parsed as an envelope; the primary key is the record's coordinates,
-- so the same record can never be stored twice, whatever range it was landed with.
create schema if not exists raw;

create table if not exists raw.order_events (
    topic            text        not null,
    kafka_partition  integer     not null,
    kafka_offset     bigint      not null,
    event_id         uuid        not null,
    aggregate_id     text        not null,
    event_type       text        not null,
    schema_version   integer     not null,
    event_ts_ms      bigint      not null,
    -- derived in the database so the hot path never formats timestamps in Python
    event_ts         timestamptz generated always as (to_timestamp(event_ts_ms / 1000.0)) stored,
    payload          jsonb       not null,
    key              text,
    headers          jsonb,
    trace_id         text,
    kafka_ts_ms      bigint,
    landed_at        timestamptz not null default now(),
    run_id           text        not null,
    primary key (topic, kafka_partition, kafka_offset)
);

-- Poison messages: kept byte for byte (bytea survives NUL bytes and invalid UTF-8) with the reason.
create table if not exists raw.dead_letters (
    topic            text        not null,
    kafka_partition  integer     not null,
    kafka_offset     bigint      not null,
    key              bytea,
    value            bytea,
    headers          jsonb,
    reason           text        not null,
    detail           text        not null,
    kafka_ts_ms      bigint,
    run_id           text        not null,
    dead_lettered_at timestamptz not null default now(),
    primary key (topic, kafka_partition, kafka_offset)
);

-- One row per landed offset range [start_offset, end_offset), written in the same transaction as
-- the rows it covers: a range is in the ledger if and only if its records are in the tables above.
create table if not exists raw.ingest_ledger (
    topic            text        not null,
    kafka_partition  integer     not null,
    start_offset     bigint      not null,
    end_offset       bigint      not null,
    partition_key    text        not null,
    messages_read    integer     not null,
    rows_landed      integer     not null,
    dead_letters     integer     not null,
    already_landed   integer     not null,
    run_id           text        not null,
    landed_at        timestamptz not null default now(),
    duration_ms      integer,
    primary key (topic, kafka_partition, start_offset, end_offset),
    check (end_offset > start_offset)
);

-- Every range the planner handed out, written before its Dagster partition is added. Plan + ledger
-- in Postgres (not the sensor cursor, which is not written atomically with the runs) are the
-- truth about where the next range starts; the planner's advisory lock keeps plans disjoint.
create table if not exists raw.ingest_plan (
    topic            text        not null,
    kafka_partition  integer     not null,
    start_offset     bigint      not null,
    end_offset       bigint      not null,
    partition_key    text        not null unique,
    planned_at       timestamptz not null default now(),
    primary key (topic, kafka_partition, start_offset, end_offset),
    check (end_offset > start_offset)
);

create index if not exists ingest_ledger_landed_at on raw.ingest_ledger (landed_at);
-- BRIN: nearly free on the hot path (landed_at only grows), lets dbt read "what landed since".
create index if not exists order_events_landed_at on raw.order_events using brin (landed_at);

-- Replaying a dead letter after a fix lands it into raw.order_events under its own coordinates
-- and marks it here; the row itself stays, as evidence.
alter table raw.dead_letters add column if not exists replayed_at timestamptz;
alter table raw.dead_letters add column if not exists replay_run_id text;

-- The audit log: one row per record landed, dead-lettered or replayed, written in the same
-- transaction as the landing. Append-only: the database refuses updates, deletes and truncates.
create schema if not exists audit;

create table if not exists audit.ingest_log (
    logged_at        timestamptz not null default now(),
    topic            text        not null,
    kafka_partition  integer     not null,
    kafka_offset     bigint      not null,
    event_id         uuid,
    outcome          text        not null,
    reason           text,
    run_id           text        not null,
    partition_key    text        not null,
    trace_id         text
);

-- landed: the first copy of its event_id; duplicate: landed, but its event_id was landed before;
-- lost: an offset Kafka deleted before it landed, acknowledged by an operator (`orderflow
-- ack-loss`, the reason in `reason`)
alter table audit.ingest_log drop constraint if exists ingest_log_outcome_check;
alter table audit.ingest_log add constraint ingest_log_outcome_check
    check (outcome in ('landed', 'duplicate', 'dead_lettered', 'replayed', 'lost'));

-- Telling a copy apart needs every event_id landed so far. An index on the events themselves is
-- the cheapest way to know them: maintained by the COPY, no second table, no per-row ON CONFLICT.
-- (It replaces raw.event_first_seen, which cost more than the COPY of the events it tracked.)
create index if not exists order_events_event_id on raw.order_events (event_id);
drop table if exists raw.event_first_seen;

-- The transaction that wrote each ledger row, so a landing can tell which landings of other
-- partitions committed while it was classifying (audit.settle_landing).
alter table raw.ingest_ledger add column if not exists xact_id xid8 not null
    default pg_current_xact_id();
create index if not exists ingest_ledger_xact_id on raw.ingest_ledger (xact_id);

-- Record metadata kept exactly (orderflow_dagster/land/metadata.py): key_bytes holds the key's
-- bytes when they are not UTF-8 text without NUL (then `key` is only a readable rendering), and
-- metadata_note says what of the record's metadata was dropped and why (a malformed
-- traceparent, headers the Kafka client cannot read), for audit.log_landing to copy into the
-- audit row's reason. Both are null in the usual case. Added before log_landing, which reads them.
alter table raw.order_events add column if not exists key_bytes bytea;
alter table raw.order_events add column if not exists metadata_note text;

-- The audit rows of the records a landing wrote in [p_start, p_end), derived in the database from
-- what it just wrote (no second stream of Python-formatted lines on the hot path). Called after
-- each gap's COPY, in offset order. A landed row is a `duplicate` when another row has its
-- event_id and is not this landing's own later copy: landed before, or earlier in the window.
-- A row's reason is its metadata_note: what of its metadata was dropped, and why.
-- p_max_landed, when given: the greatest event_id landed before the window's COPY began (read
-- after the landing's classification snapshot; nil if none). A row whose event_id is greater,
-- and first of its id in the window, can have no earlier copy and skips the index probe; with
-- time-ordered (UUIDv7) ids that is nearly every row. Copies committed by other partitions
-- since are audit.settle_landing's business, as before. Without it (the landing passes none
-- when most of the window's ids are not above it, as with random ids), every row probes, in
-- offset order, and the window is not sorted.
-- dropped first: create or replace cannot rename parameters or change the language
drop function if exists audit.log_landing(text, integer, bigint, bigint, text, text);
drop function if exists audit.log_landing(text, integer, bigint, bigint, text, text, uuid);
create or replace function audit.log_landing(
    p_topic text, p_partition integer, p_start bigint, p_end bigint, p_run_id text, p_key text,
    p_max_landed uuid
) returns void
language sql
-- Landed offsets always lie past the column statistics, so the planner may expect ~1 row and
-- scan instead of probing the index; per landed row that is quadratic. Index paths only.
set enable_seqscan = off
-- The window's sort by event_id (about 100 bytes a row in memory) stays in memory up to about
-- 600,000 rows instead of spilling to disk past about 40,000 at the default 4MB; larger
-- windows still spill, so memory stays bounded.
set work_mem = '64MB'
as $$
insert into audit.ingest_log (topic, kafka_partition, kafka_offset, event_id, outcome, reason,
                              run_id, partition_key, trace_id)
select l.topic, l.kafka_partition, l.kafka_offset, l.event_id,
       case
           when row_number() over (partition by l.event_id order by l.kafka_offset) > 1
               then 'duplicate'
           when l.event_id > p_max_landed then 'landed'
           when exists (
               select from raw.order_events o
               where o.event_id = l.event_id
                 and (o.kafka_offset < l.kafka_offset or o.kafka_offset >= p_end
                      or o.topic <> p_topic or o.kafka_partition <> p_partition
                      or o.run_id <> p_run_id)
           ) then 'duplicate'
           else 'landed'
       end,
       l.metadata_note, l.run_id, p_key, l.trace_id
from raw.order_events l
where p_max_landed is not null
  and l.topic = p_topic and l.kafka_partition = p_partition
  and l.kafka_offset >= p_start and l.kafka_offset < p_end and l.run_id = p_run_id;

insert into audit.ingest_log (topic, kafka_partition, kafka_offset, event_id, outcome, reason,
                              run_id, partition_key, trace_id)
select l.topic, l.kafka_partition, l.kafka_offset, l.event_id,
       case when exists (
           select from raw.order_events o
           where o.event_id = l.event_id
             -- rows past the window, even of this run, are from an earlier landing: the
             -- landing writes and classifies its gaps in offset order
             and (o.kafka_offset < l.kafka_offset or o.kafka_offset >= p_end
                  or o.topic <> p_topic or o.kafka_partition <> p_partition
                  or o.run_id <> p_run_id)
       ) then 'duplicate' else 'landed' end,
       l.metadata_note, l.run_id, p_key, l.trace_id
from raw.order_events l
where p_max_landed is null
  and l.topic = p_topic and l.kafka_partition = p_partition
  and l.kafka_offset >= p_start and l.kafka_offset < p_end and l.run_id = p_run_id
union all
select topic, kafka_partition, kafka_offset, null, 'dead_lettered', reason, run_id, p_key, null
from raw.dead_letters
where topic = p_topic and kafka_partition = p_partition
  and kafka_offset >= p_start and kafka_offset < p_end and run_id = p_run_id
$$;

-- A copy can also arrive on another partition (a re-keyed resend, a topic given more partitions)
-- and be landed by a concurrent transaction that log_landing could not see: both would say
-- `landed`. Called last, before the ledger row: under a per-topic lock held to commit, it looks
-- for copies of this landing's events in the landings of other partitions that were not visible
-- to its first classification (p_snapshot, taken before it), and if one exists, fails the
-- transaction as a serialization failure: the caller lands the range again and sees that copy.
-- Only this check takes turns between the partitions of a topic, and it costs nothing unless
-- another partition committed meanwhile. The lock key is store.LOCK_AUDIT.
create or replace function audit.settle_landing(
    p_topic text, p_partition integer, p_starts bigint[], p_ends bigint[], p_run_id text,
    p_snapshot pg_snapshot
) returns void
language plpgsql
set enable_seqscan = off
as $$
declare
    theirs record;
begin
    perform pg_advisory_xact_lock(3858, hashtext(p_topic));
    -- the landings of other partitions this one could not see (usually none): recent ledger rows.
    -- Only xact_id is offered to the scan (offset 0), so it reads the rows written since the
    -- snapshot's xmin: given the topic too, the planner may take an index that leads with it
    -- and read the topic's whole ledger on every landing.
    for theirs in
        select start_offset, end_offset, kafka_partition
        from (select topic, kafka_partition, start_offset, end_offset, xact_id
              from raw.ingest_ledger
              where xact_id >= pg_snapshot_xmin(p_snapshot)
              offset 0) recent
        where not pg_visible_in_snapshot(xact_id, p_snapshot)
          and topic = p_topic and kafka_partition <> p_partition
    loop
        -- each of their rows probes the event_id index for a copy among ours (a scalar
        -- subquery in the select list: one probe per row, whatever the planner estimates).
        -- Only event_id is offered to the probe's scan (offset 0 keeps the other conditions
        -- out of it): given topic and partition too, the planner takes the primary key, whose
        -- statistics predate the rows it just wrote, and reads all of ours for each of theirs.
        if exists (
            select
            from (
                select (select true
                        from (select c.topic, c.kafka_partition, c.run_id, c.kafka_offset
                              from raw.order_events c
                              where c.event_id = o.event_id
                              offset 0) m
                        where m.topic = p_topic and m.kafka_partition = p_partition
                          and m.run_id = p_run_id
                          and exists (select from unnest(p_starts, p_ends) w(s, e)
                                      where m.kafka_offset >= w.s and m.kafka_offset < w.e)
                        limit 1) as ours
                from raw.order_events o
                where o.topic = p_topic and o.kafka_partition = theirs.kafka_partition
                  and o.kafka_offset >= theirs.start_offset
                  and o.kafka_offset < theirs.end_offset
                offset 0
            ) probe
            where probe.ours
        ) then
            raise exception 'a copy of an event of %|% was landed on another partition meanwhile',
                p_topic, p_partition
                using errcode = 'serialization_failure',
                      hint = 'land the range again: it will see that copy';
        end if;
    end loop;
end
$$;

create or replace function audit.refuse_change() returns trigger language plpgsql as $$
begin
    raise exception 'audit.ingest_log is append-only: % refused', tg_op
        using errcode = 'insufficient_privilege';
end
$$;

create or replace trigger ingest_log_append_only
    before update or delete or truncate on audit.ingest_log
    for each statement execute function audit.refuse_change();

-- Dead-letter replays. A replay lands rows outside any ledger range (the ledger's ranges stay
-- contiguous and disjoint), so the ledger alone cannot tell the dbt sensor that raw changed: one
-- row per replay transaction, written in it, does. xact_id as in raw.ingest_ledger, for readers
-- that follow commit order.
create table if not exists raw.replay_log (
    replay_id        bigint      generated always as identity primary key,
    topic            text        not null,
    run_id           text        not null,
    rows_replayed    integer     not null,
    still_invalid    integer     not null,
    replayed_at      timestamptz not null default now(),
    xact_id          xid8        not null default pg_current_xact_id()
);

-- Lost offsets: what Kafka's log still held when a range landed, and losses acknowledged by hand.
-- log_start_offset: the partition's log start offset (low watermark) the landing saw before it
-- read anything. A missing offset below it was deleted by retention before it could land (a
-- loss); a missing offset at or above it held no record when it was read (a transaction marker,
-- a compacted record). Null on rows landed before it was recorded.
alter table raw.ingest_ledger add column if not exists log_start_offset bigint;
-- acknowledged_loss: the operator's reason, on the rows `orderflow ack-loss` writes for offsets
-- Kafka deleted before they landed. Such a row holds no record; each of its offsets has one
-- `lost` row in audit.ingest_log, and its log_start_offset is at or past its end.
alter table raw.ingest_ledger add column if not exists acknowledged_loss text;

-- Topic incarnations. A Kafka topic deleted and created again restarts its offsets under a new
-- topic id; the ledger must never take the new log's offsets for the old one's. Every incarnation
-- planning sees is registered here with the stream its rows are stored under: the bare topic for
-- the first, `<topic>@<topic id>` for a later one (Kafka topic names cannot hold '@'), so that
-- the coordinates (topic, kafka_partition, kafka_offset) of raw rows, the ledger, the audit and
-- the marts never mix incarnations. See orderflow_dagster/land/incarnations.py.
create table if not exists raw.topic_incarnations (
    stream           text        primary key,
    topic            text        not null,
    -- Kafka's topic id, as kafka-topics.sh --describe prints it
    topic_id         text        not null,
    seq              bigint      generated always as identity,
    reason           text        not null,
    registered_at    timestamptz not null default now(),
    -- per partition, the greatest log end planning saw: what a retired stream had in Kafka
    high_watermarks  jsonb
);
create index if not exists topic_incarnations_topic on raw.topic_incarnations (topic, seq);

-- The topic id each range was planned and landed under (null: before topic ids were recorded).
alter table raw.ingest_plan add column if not exists topic_id text;
alter table raw.ingest_ledger add column if not exists topic_id text;

-- A writer that gives no topic id (an acknowledged loss, a replay) records its stream's own.
create or replace function raw.fill_topic_id() returns trigger language plpgsql as $$
begin
    if new.topic_id is null then
        select i.topic_id into new.topic_id from raw.topic_incarnations i where i.stream = new.topic;
    end if;
    return new;
end
$$;
create or replace trigger ingest_ledger_topic_id before insert on raw.ingest_ledger
    for each row execute function raw.fill_topic_id();
create or replace trigger ingest_plan_topic_id before insert on raw.ingest_plan
    for each row execute function raw.fill_topic_id();

-- ---------------------------------------------------------------------------------------------
-- Canonical JSON text of a copy's content, which stg_order_events hashes (content_hash).
-- jsonb keeps a number as written: 10.50 stays 10.50 beside 10.5. The fast reader stores the
-- producer's digits, the thorough one the shortest decimal of the double it read (10.5, and 0.1
-- for 0.1000000000000000055511151231257827), and producers differ too, so copies the readers
-- read alike would hash differently. In this text every fraction loses its trailing zeros, as
-- trim_scale does to a numeric (10.50 -> 10.5, 100.0 -> 100), and a fraction of six decimals or
-- more is the shortest decimal of its nearest double; integers, strings and everything else stay
-- as they are. Spellings of one double below 10^10 (all money) so get one text: with at most 15
-- significant digits a decimal is the shortest one of its double already.
--
-- Only a text holding such a fraction changes. One regular expression finds one (jsonb's text
-- writes no exponent, and a number ends at `,`, `]`, `}` or the end of the text); any other text
-- is returned as it is, so its hash is the one of the plain jsonb text it always was.
create or replace function raw.canonical_json_number(value numeric) returns numeric
language sql immutable strict parallel safe
-- float8's text is its shortest round-trip decimal whenever extra_float_digits > 0
set extra_float_digits = 1
as $$
    select case
        -- within float8's range: it rounds to neither zero nor infinity
        when scale(trim_scale(value)) >= 6 and abs(value) between 2.5e-324 and 1e308
            then trim_scale(value::float8::text::numeric)
        else trim_scale(value)
    end
$$;

create or replace function raw.canonical_json_text(content jsonb) returns text
language plpgsql immutable strict parallel safe as $$
declare
    json_text text := content::text;
begin
    if not json_text ~ '\.[0-9]*(0([],}]|$)|[0-9]{6})' then
        return json_text;
    end if;
    -- tokens: a whole string, a number, or a run of anything else (never split in between)
    return (
        select string_agg(
            case
                when token ~ '^-?[0-9]' then raw.canonical_json_number(token::numeric)::text
                else token
            end,
            '' order by position
        )
        from regexp_matches(
            json_text, '"(?:[^"\\]|\\.)*"|-?[0-9]+(?:\.[0-9]+)?|[^"0-9-]+|-', 'g'
        ) with ordinality as match (tokens, position)
        cross join lateral (select match.tokens[1] as token) as matched
    );
end
$$;

-- Commit order: the transaction that wrote each row, as a plain bigint (the 64-bit xid8 value) so
-- that a BRIN index can serve it (there is no BRIN operator class for xid8). dbt's event_copies
-- reads the rows of the transactions that were not yet committed in the snapshot its previous run
-- recorded, so a landing or a replay that commits long after it began is still read. The default
-- is stable, not volatile: adding the column rewrites nothing (the rows already there get the
-- xid of this migration, which committed before any snapshot dbt records afterwards), and COPY
-- keeps its multi-row inserts.
alter table raw.order_events add column if not exists xact_id bigint not null
    default (pg_current_xact_id()::text::bigint);
create index if not exists order_events_xact_id on raw.order_events using brin (xact_id);

-- Partitions `orderflow backfill` added to Dagster again (the retention sensor retires landed
-- ranges' partitions; the ledger keeps them). Retention keeps each for a whole retention from
-- readded_at, so it can be backfilled in the UI. selection: the window the operator asked for.
create table if not exists raw.backfill_readds (
    partition_key    text        primary key,
    readded_at       timestamptz not null default now(),
    selection        text        not null
);

-- ---------------------------------------------------------------------------------------------
-- Watermarks: what planning, landing and the commit repair read instead of the whole history.
-- Per (stream, Kafka partition): origin, where its first planned or landed range starts, and
-- landed_to, the end of the contiguous landed prefix from there (what Kafka's committed offset may
-- reach). Below landed_to every offset is covered by the ledger, so only plan and ledger rows that
-- end past it say anything a tick, a landing or a repair needs; those are few (the ranges in
-- flight and the ones landed out of order above a gap), whatever the history. Every ledger and
-- plan row is kept: the ledger stays the truth (verify and stg_ingest_ledger read all of it), and
-- the watermark is derived from it, in the transaction that writes it, by the triggers below.
-- Plan rows below the watermark are never read again but kept too: deleting them would cost the
-- landing a write per range to save a row each, and they hold when and under which topic id each
-- range was planned, which verify checks.
-- ledger_rows counts the partition's ledger rows, so the dbt sensor learns that something landed
-- without counting the ledger.
create table if not exists raw.ingest_watermarks (
    topic            text        not null,
    kafka_partition  integer     not null,
    origin           bigint      not null,
    landed_to        bigint      not null,
    ledger_rows      bigint      not null,
    primary key (topic, kafka_partition),
    check (landed_to >= origin)
);
-- "rows ending past the watermark" as index range scans: plans and ledgers are disjoint per
-- partition, so those are exactly the rows above it
create index if not exists ingest_plan_end
    on raw.ingest_plan (topic, kafka_partition, end_offset) include (start_offset);
create index if not exists ingest_ledger_end
    on raw.ingest_ledger (topic, kafka_partition, end_offset) include (start_offset);

-- The end of the landed run of offsets from p_from: ledger rows ending past it, in start order,
-- up to the first one that starts past everything before it. One sorted pass over the rows above
-- p_from (a loop of lookups would be quadratic in them when a whole history is computed at once).
create or replace function raw.landed_reach(p_topic text, p_partition integer, p_from bigint)
returns bigint
language sql stable
-- a small ledger (a new deployment) would be scanned whole, and the rows above a watermark lie
-- past the column statistics: index paths only, as in audit.log_landing
set enable_seqscan = off
as $$
    -- materialized: the scan is chosen for its condition alone, not for the sort the window
    -- needs (the primary key's order would save that sort, and read the whole partition)
    with rows_above as materialized (
        select start_offset, end_offset
        from raw.ingest_ledger
        where topic = p_topic and kafka_partition = p_partition and end_offset > p_from
    ),
    above as (
        select start_offset as s, end_offset as e,
               greatest(p_from, max(end_offset) over (order by start_offset, end_offset
                   rows between unbounded preceding and 1 preceding)) as reach
        from rows_above
    ),
    gap as (select min(s) as s from above where s > reach)
    select greatest(p_from, max(above.e))
    from above, gap
    where gap.s is null or above.s < gap.s
$$;

-- What planning, a landing and ack-loss read of a stream's plan and ledger: per partition (all
-- of them, or p_partition), its watermark and the rows ending past it, each an index range scan
-- on (topic, kafka_partition, end_offset); the plan's only if p_with_plan. One statement, so a
-- watermark and the rows above it are read as one commit left them. `offset 0` keeps the lateral
-- subquery a subquery, so the planner cannot turn it into a join that reads a whole table.
create or replace function raw.above_watermarks(
    p_topic text, p_partition integer, p_with_plan boolean
) returns table (
    kafka_partition integer, origin bigint, landed_to bigint, planned boolean,
    start_offset bigint, end_offset bigint
)
language sql stable
set enable_seqscan = off
as $$
    select w.kafka_partition, w.origin, w.landed_to, above.planned, above.start_offset,
           above.end_offset
    from raw.ingest_watermarks w
    left join lateral (
        select true as planned, p.start_offset, p.end_offset
        from raw.ingest_plan p
        where p_with_plan and p.topic = w.topic and p.kafka_partition = w.kafka_partition
          and p.end_offset > w.landed_to
        union all
        select false, l.start_offset, l.end_offset
        from raw.ingest_ledger l
        where l.topic = w.topic and l.kafka_partition = w.kafka_partition
          and l.end_offset > w.landed_to
        offset 0
    ) above on true
    where w.topic = p_topic and (p_partition is null or w.kafka_partition = p_partition)
    order by w.kafka_partition, above.start_offset
$$;

-- A partition's watermark computed from all of its plan and ledger rows: for a partition seen for
-- the first time (few rows), after rows were deleted or moved, and to backfill a deployment whose
-- history predates the table. The row is locked before anything is read, so a concurrent writer's
-- rows are either committed (and read: each statement of a read committed transaction sees what
-- committed before it) or wait for this transaction.
create or replace function raw.compute_watermark(p_topic text, p_partition integer) returns void
language plpgsql
as $$
declare
    v_origin bigint;
begin
    insert into raw.ingest_watermarks (topic, kafka_partition, origin, landed_to, ledger_rows)
    values (p_topic, p_partition, 0, 0, 0) on conflict do nothing;
    perform from raw.ingest_watermarks
    where topic = p_topic and kafka_partition = p_partition for update;
    select min(s) into v_origin from (
        (select start_offset from raw.ingest_plan
         where topic = p_topic and kafka_partition = p_partition order by start_offset limit 1)
        union all
        (select start_offset from raw.ingest_ledger
         where topic = p_topic and kafka_partition = p_partition order by start_offset limit 1)
    ) starts(s);
    if v_origin is null then
        delete from raw.ingest_watermarks where topic = p_topic and kafka_partition = p_partition;
        return;
    end if;
    update raw.ingest_watermarks
    set origin = v_origin,
        landed_to = raw.landed_reach(p_topic, p_partition, v_origin),
        ledger_rows = (select count(*) from raw.ingest_ledger
                       where topic = p_topic and kafka_partition = p_partition)
    where topic = p_topic and kafka_partition = p_partition;
end
$$;

-- compute_watermark for each (topic, partition) of the arrays, once each, in key order (so that
-- concurrent callers lock them in the same order).
create or replace function raw.compute_watermarks(p_topics text[], p_partitions integer[])
returns void
language plpgsql
as $$
declare
    part record;
begin
    for part in
        select distinct t, p from unnest(p_topics, p_partitions) parts(t, p) order by t, p
    loop
        perform raw.compute_watermark(part.t, part.p);
    end loop;
end
$$;

-- New ledger rows advance the watermark from where it stood, reading only the rows above it, and
-- only when one of them starts at or below it (a row landed out of order above a gap cannot move
-- the prefix). Under the watermark row's lock, taken before reading: landings of one partition
-- take turns anyway (their landing lock), so the lock costs them nothing.
create or replace function raw.watermarks_after_ledger_insert() returns trigger
language plpgsql
as $$
declare
    part record;
    mark record;
begin
    for part in
        select topic, kafka_partition, min(start_offset) as first_start, count(*) as n
        from added group by topic, kafka_partition order by topic, kafka_partition
    loop
        select origin, landed_to into mark from raw.ingest_watermarks
        where topic = part.topic and kafka_partition = part.kafka_partition for update;
        if not found or part.first_start < mark.origin then
            perform raw.compute_watermark(part.topic, part.kafka_partition);
        elsif part.first_start <= mark.landed_to then
            update raw.ingest_watermarks
            set landed_to = raw.landed_reach(part.topic, part.kafka_partition, mark.landed_to),
                ledger_rows = ledger_rows + part.n
            where topic = part.topic and kafka_partition = part.kafka_partition;
        else
            update raw.ingest_watermarks set ledger_rows = ledger_rows + part.n
            where topic = part.topic and kafka_partition = part.kafka_partition;
        end if;
    end loop;
    return null;
end
$$;

-- New plan rows only matter to a partition planned for the first time (or below its origin).
create or replace function raw.watermarks_after_plan_insert() returns trigger
language plpgsql
as $$
begin
    perform raw.compute_watermarks(array_agg(a.topic), array_agg(a.kafka_partition))
    from (select topic, kafka_partition, min(start_offset) as first_start
          from added group by topic, kafka_partition) a
    left join raw.ingest_watermarks w using (topic, kafka_partition)
    where w.origin is null or a.first_start < w.origin;
    return null;
end
$$;

-- Rows deleted, moved by an update of their coordinates, or truncated: the watermark of each
-- partition they left is computed again from what remains. orderflow itself never does any.
create or replace function raw.watermarks_after_removal() returns trigger
language plpgsql
as $$
begin
    if tg_op = 'TRUNCATE' then
        perform raw.compute_watermarks(array_agg(topic), array_agg(kafka_partition))
        from raw.ingest_watermarks;
    else
        perform raw.compute_watermarks(array_agg(topic), array_agg(kafka_partition))
        from removed;
    end if;
    return null;
end
$$;

create or replace function raw.watermarks_after_move() returns trigger
language plpgsql
as $$
begin
    perform raw.compute_watermarks(
        array[old.topic, new.topic], array[old.kafka_partition, new.kafka_partition]
    );
    return null;
end
$$;

create or replace trigger ingest_ledger_watermarks after insert on raw.ingest_ledger
    referencing new table as added
    for each statement execute function raw.watermarks_after_ledger_insert();
create or replace trigger ingest_plan_watermarks after insert on raw.ingest_plan
    referencing new table as added
    for each statement execute function raw.watermarks_after_plan_insert();
create or replace trigger ingest_ledger_watermarks_delete after delete on raw.ingest_ledger
    referencing old table as removed
    for each statement execute function raw.watermarks_after_removal();
create or replace trigger ingest_plan_watermarks_delete after delete on raw.ingest_plan
    referencing old table as removed
    for each statement execute function raw.watermarks_after_removal();
create or replace trigger ingest_ledger_watermarks_move
    after update of topic, kafka_partition, start_offset, end_offset on raw.ingest_ledger
    for each row execute function raw.watermarks_after_move();
create or replace trigger ingest_plan_watermarks_move
    after update of topic, kafka_partition, start_offset, end_offset on raw.ingest_plan
    for each row execute function raw.watermarks_after_move();
create or replace trigger ingest_ledger_watermarks_truncate after truncate on raw.ingest_ledger
    for each statement execute function raw.watermarks_after_removal();
create or replace trigger ingest_plan_watermarks_truncate after truncate on raw.ingest_plan
    for each statement execute function raw.watermarks_after_removal();

-- A deployment whose plan and ledger predate the watermarks gets them from its whole history,
-- once: from then on the triggers keep every partition's (they are in place before this runs, and
-- creating them waited for every writer in flight, so no row escapes both).
do $$
begin
    if not exists (select from raw.ingest_watermarks) then
        perform raw.compute_watermarks(array_agg(topic), array_agg(kafka_partition))
        from (select topic, kafka_partition from raw.ingest_plan
              union
              select topic, kafka_partition from raw.ingest_ledger) parts;
    end if;
end
$$;

-- Replays that landed rows, per topic: what the dbt sensor reads instead of counting
-- raw.replay_log. Kept by its insert trigger, backfilled once from the rows already there.
create table if not exists raw.replay_totals (
    topic            text        primary key,
    replays          bigint      not null,
    last_replayed_at timestamptz
);

create or replace function raw.replay_totals_after_insert() returns trigger
language plpgsql
as $$
begin
    insert into raw.replay_totals as t (topic, replays, last_replayed_at)
    select topic, count(*), max(replayed_at) from added where rows_replayed > 0 group by topic
    on conflict (topic) do update
    set replays = t.replays + excluded.replays,
        last_replayed_at = greatest(t.last_replayed_at, excluded.last_replayed_at);
    return null;
end
$$;
create or replace trigger replay_log_totals after insert on raw.replay_log
    referencing new table as added
    for each statement execute function raw.replay_totals_after_insert();

insert into raw.replay_totals (topic, replays, last_replayed_at)
select topic, count(*), max(replayed_at) from raw.replay_log
where rows_replayed > 0 and not exists (select from raw.replay_totals)
group by topic;
