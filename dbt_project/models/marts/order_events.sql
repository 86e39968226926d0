-- One row per distinct event (event_id), typed and enriched with the customer.
--
-- Dedup: of all copies of an event_id, on any partition, the first one landed wins, ordered by
-- (landed_at, topic, kafka_partition, kafka_offset). See docs/dbt.md for why that order.
--
-- Incremental: the copies event_copies appended since this model last wrote (its lookback on
-- landed_at catches late-committed landings) are the slice; for every event_id in the slice the
-- winner is picked again among the slice and the stored winner. Seeing a copy twice changes
-- nothing, so the table always equals a full refresh. Only winners that are new or changed are
-- written; they get a fresh transformed_at, which is how order_status and order_status_history
-- find the orders to recompute.
--
-- The key (event_id, the primary key), the not-null columns and the accepted event types are
-- constraints of the model's contract (order_events.yml), checked by Postgres on every insert.

{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='event_id',
        on_schema_change='fail',
        pre_hook="{{ serialize_incremental_runs() }}",
        indexes=[
            {'columns': ['order_id', 'event_ts_ms desc', 'event_id desc', 'event_type']},
            {'columns': ['transformed_at']},
        ],
    )
}}

{%- set event_columns = [
    'event_id', 'order_id', 'event_type', 'schema_version', 'event_at', 'event_ts_ms',
    'customer_id', 'order_total', 'currency', 'channel', 'items', 'item_count',
    'payment_id', 'payment_amount', 'payment_method',
    'shipment_id', 'carrier', 'tracking_number', 'signed_by', 'cancel_reason',
    'trace_id', 'topic', 'kafka_partition', 'kafka_offset', 'landed_at', 'content_hash',
] -%}

with

{% if is_incremental() %}

-- computed once: inlined into the filter, Postgres may evaluate it for every row
watermark as materialized (

    select coalesce(max(transformed_at), '-infinity'::timestamptz) as transformed_since
    from {{ this }}

),

{% endif %}

-- the dedup needs only these columns; the typed ones are computed for the winners alone
landed_copies as (

    select
        event_id,
        landed_at,
        topic,
        kafka_partition,
        kafka_offset,
        false as is_stored

    from {{ ref('event_copies') }}
    {% if is_incremental() %}
    where transformed_at > (select transformed_since from watermark)
    {% endif %}

),

{% if is_incremental() %}

stored_winners as (

    select
        stored.event_id,
        stored.landed_at,
        stored.topic,
        stored.kafka_partition,
        stored.kafka_offset,
        true as is_stored

    from (select distinct event_id from landed_copies) as slice_ids
    cross join lateral (
        select * from {{ this }} as stored_event
        where stored_event.event_id = slice_ids.event_id
        limit 1
    ) as stored

),

{% endif %}

candidates as (

    select * from landed_copies
    {% if is_incremental() %}
    union all
    select * from stored_winners
    {% endif %}

),

ranked as (

    select
        *,
        row_number() over (
            partition by event_id
            -- is_stored last: a stored winner read again wins over its own copy, so is kept as is
            order by landed_at, topic, kafka_partition, kafka_offset, is_stored desc
        ) as copy_rank

    from candidates

),

-- winners that are not stored yet: new events, or an earlier copy that committed late
new_winners as (

    select
        topic,
        kafka_partition,
        kafka_offset

    from ranked
    where copy_rank = 1 and not is_stored

),

winning_copies as (

    select stg_order_events.*

    from {{ ref('stg_order_events') }} as stg_order_events
    inner join new_winners
        on stg_order_events.topic = new_winners.topic
        and stg_order_events.kafka_partition = new_winners.kafka_partition
        and stg_order_events.kafka_offset = new_winners.kafka_offset
    {% if is_incremental() %}
    where stg_order_events.landed_at >= (select min(landed_at) from landed_copies)
    {% endif %}

),

customers as (

    select * from {{ ref('customers') }}

),

enriched as (

    select
        {% for column in event_columns -%}
        winning_copies.{{ column }},
        {% endfor -%}
        customers.name as customer_name,
        customers.segment as customer_segment,
        customers.country as customer_country,
        -- taken after serialize_incremental_runs() granted its lock; see that macro
        statement_timestamp() as transformed_at

    from winning_copies
    left join customers
        on winning_copies.customer_id = customers.customer_id

)

select * from enriched
