-- One row per landed copy of an event (one per raw row): its coordinates, when it landed and a
-- hash of its content. A narrow, event_id-indexed ledger of raw.order_events that order_events
-- deduplicates from and event_id_conflicts reports on.
--
-- Incremental, and the only model that reads raw: by commit order, not by time. Each run records
-- the snapshot it reads in (serialize_incremental_runs, in incremental_runs) and reads the raw
-- rows of the transactions that had not committed in the snapshot its previous run recorded:
-- those that began after it, and those still running then, however long they ran on (a landing
-- waiting on its partition's lock, a long dead-letter replay). The recorded snapshot is taken
-- before this run's statement reads, so a row committed in between is read now and again next
-- time, never missed; the second time the coordinates are held already and nothing is appended.
-- By induction every raw row visible in the last recorded snapshot is here. Every row appended
-- is stamped with transformed_at, which is how order_events finds the copies it has not seen.
--
-- Keys and not-null columns are constraints of the model's contract (event_copies.yml), checked by
-- Postgres on every insert; the primary key's index also serves the "not held yet" check.

{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        on_schema_change='fail',
        pre_hook="{{ serialize_incremental_runs() }}",
        indexes=[
            {'columns': ['event_id', 'content_hash']},
            {'columns': ['transformed_at']},
        ],
    )
}}

{%- set copy_columns = [
    'event_id', 'order_id', 'content_hash', 'topic', 'kafka_partition', 'kafka_offset', 'landed_at',
] -%}

with

{% if is_incremental() %}

-- computed once: inlined into the scans of raw rows, Postgres may evaluate it for every row
previous_read as materialized (

    select {{ previous_run_snapshot() }} as snapshot

),

-- Two scans that the BRIN index on raw.order_events(xact_id) serves: the transactions begun
-- after the previous read, up to this statement's snapshot (bounded on both sides, so that
-- Postgres expects a narrow range rather than a third of the table), and one probe per
-- transaction that was running then. Rows of transactions that had committed are not read
-- again, however recent.
unread as (

    select {{ copy_columns | join(', ') }}
    from {{ ref('stg_order_events') }} as stg_order_events
    where stg_order_events.xact_id
        >= (select pg_snapshot_xmax(snapshot)::text::bigint from previous_read)
        and stg_order_events.xact_id < pg_snapshot_xmax(pg_current_snapshot())::text::bigint

    union all

    select {{ copy_columns | join(', ') }}
    from previous_read
    cross join lateral pg_snapshot_xip(previous_read.snapshot) as running (xact_id)
    cross join lateral (
        select {{ copy_columns | join(', ') }}
        from {{ ref('stg_order_events') }} as stg_order_events
        where stg_order_events.xact_id = running.xact_id::text::bigint
        offset 0
    ) as running_rows

),

{% endif %}

landed_copies as (

    select {{ copy_columns | join(', ') }}
    {% if is_incremental() %}
    from unread
    where not exists (
        select 1
        from {{ this }} as stored
        where stored.topic = unread.topic
            and stored.kafka_partition = unread.kafka_partition
            and stored.kafka_offset = unread.kafka_offset
    )
    {% else %}
    from {{ ref('stg_order_events') }}
    {% endif %}

),

final as (

    select
        *,
        -- taken after serialize_incremental_runs() granted its lock; see that macro
        statement_timestamp() as transformed_at

    from landed_copies

)

select * from final
