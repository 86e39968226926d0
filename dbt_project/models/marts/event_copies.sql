-- One row per landed copy of an event (one per raw row): its coordinates, when it landed and a
-- hash of its content. A narrow, event_id-indexed ledger of raw.order_events that order_events
-- deduplicates from and event_id_conflicts reports on.
--
-- Incremental, and the only model that reads raw by landed_at: it reads the rows landed since the
-- newest landed_at it holds minus var('landing_lookback') - a landing transaction that started
-- earlier can commit later, and its rows carry its start time - and appends those whose
-- coordinates it does not hold yet. Reading a row twice changes nothing. Every row appended is
-- stamped with transformed_at, which is how order_events finds the copies it has not seen.
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
            {'columns': ['landed_at']},
            {'columns': ['transformed_at']},
        ],
    )
}}

with

{% if is_incremental() %}

-- computed once: inlined into the scan of raw rows, Postgres may evaluate it for every row
watermark as materialized (

    select
        coalesce(max(landed_at), '-infinity'::timestamptz)
            - interval '{{ var("landing_lookback") }}' as landed_since

    from {{ this }}

),

{% endif %}

landed_copies as (

    select
        event_id,
        order_id,
        content_hash,
        topic,
        kafka_partition,
        kafka_offset,
        landed_at

    from {{ ref('stg_order_events') }} as stg_order_events
    {% if is_incremental() %}
    -- the BRIN index on raw.order_events(landed_at) serves this range
    where stg_order_events.landed_at >= (select landed_since from watermark)
        and not exists (
            select 1
            from {{ this }} as stored
            where stored.topic = stg_order_events.topic
                and stored.kafka_partition = stg_order_events.kafka_partition
                and stored.kafka_offset = stg_order_events.kafka_offset
        )
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
