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

-- landed: the first copy of its event_id; duplicate: landed, but its event_id was landed before
alter table audit.ingest_log drop constraint if exists ingest_log_outcome_check;
alter table audit.ingest_log add constraint ingest_log_outcome_check
    check (outcome in ('landed', 'duplicate', 'dead_lettered', 'replayed'));

-- The first landed copy of every event_id, so the audit log can tell copies apart in the landing
-- transaction. Narrow and written once per range, server-side (dbt still does the dedup).
create table if not exists raw.event_first_seen (
    event_id         uuid        primary key,
    topic            text        not null,
    kafka_partition  integer     not null,
    kafka_offset     bigint      not null
);

-- The audit rows of one landed window, derived in the database from what the run just wrote (no
-- second stream of Python-formatted lines on the hot path). One statement: the first copy of each
-- new event_id goes to raw.event_first_seen, and its RETURNING tells `landed` from `duplicate`.
create or replace function audit.log_landing(
    p_topic text, p_partition integer, p_start bigint, p_end bigint, p_run_id text, p_key text
) returns void
language sql
-- A landed window always lies past the column statistics, so the planner expects ~1 row and,
-- left alone, joins the two CTE results below in a nested loop: quadratic, hours for a range of
-- 100,000 events. A hash join is linear whatever the estimates.
set enable_nestloop = off
as $$
with landed as materialized (
    select topic, kafka_partition, kafka_offset, event_id, run_id, trace_id
    from raw.order_events
    where topic = p_topic and kafka_partition = p_partition
      and kafka_offset >= p_start and kafka_offset < p_end and run_id = p_run_id
),
firsts as (
    -- in offset order: the first copy within the window is the one that counts as landed
    insert into raw.event_first_seen (event_id, topic, kafka_partition, kafka_offset)
    select event_id, topic, kafka_partition, kafka_offset from landed order by kafka_offset
    on conflict (event_id) do nothing
    returning kafka_offset
)
insert into audit.ingest_log (topic, kafka_partition, kafka_offset, event_id, outcome, reason,
                              run_id, partition_key, trace_id)
select l.topic, l.kafka_partition, l.kafka_offset, l.event_id,
       case when f.kafka_offset is null then 'duplicate' else 'landed' end, null, l.run_id,
       p_key, l.trace_id
from landed l
left join firsts f on f.kafka_offset = l.kafka_offset
union all
select topic, kafka_partition, kafka_offset, null, 'dead_lettered', reason, run_id, p_key, null
from raw.dead_letters
where topic = p_topic and kafka_partition = p_partition
  and kafka_offset >= p_start and kafka_offset < p_end and run_id = p_run_id
order by 3
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
