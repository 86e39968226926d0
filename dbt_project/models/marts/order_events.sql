-- One row per distinct event (event_id), typed and enriched with the customer.
--
-- Dedup: of all copies of an event_id, on any partition, the first one landed wins, ordered by
-- (landed_at, topic, kafka_partition, kafka_offset). See docs/dbt.md for why that order.
-- other_order_ids lists the other orders that copies of the event name (conflicting copies): the
-- orders it may have been counted in before a copy ordered earlier committed later and won, which
-- order_status and order_status_history recompute along with order_id.
--
-- Incremental: the copies event_copies appended since this model last wrote are the slice; for
-- every event_id in the slice the winner and other_order_ids are computed again from the slice
-- and the stored row. Seeing a copy twice changes nothing, so the table always equals a full
-- refresh. Only rows that are new or changed (a new winner, another order named) are written;
-- they get a fresh transformed_at, which is how order_status and order_status_history find the
-- orders to recompute.
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
        order_id,
        landed_at,
        topic,
        kafka_partition,
        kafka_offset,
        null::jsonb as other_order_ids,
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
        stored.order_id,
        stored.landed_at,
        stored.topic,
        stored.kafka_partition,
        stored.kafka_offset,
        stored.other_order_ids,
        true as is_stored

    from (select distinct event_id from landed_copies) as slice_ids
    cross join lateral (
        select * from {{ this }} as stored_event
        where stored_event.event_id = slice_ids.event_id
        limit 1
    ) as stored

),

{% endif %}

-- every copy of an event_id read, and its stored row: together they name every order any copy of
-- the event names (the stored row's order_id and other_order_ids stand for the copies before)
candidates as (

    select * from landed_copies
    {% if is_incremental() %}
    union all
    select * from stored_winners
    {% endif %}

),

-- Window functions and per-row subqueries only, no join between CTEs: Postgres cannot size a
-- CTE, and a join of two it takes for a handful of rows may be planned as a nested loop that
-- reruns one side per row of the other, quadratic in the events read.
ranked as (

    select
        *,
        row_number() over (
            partition by event_id
            -- is_stored last: a stored winner read again wins over its own copy, so is kept as is
            order by landed_at, topic, kafka_partition, kafka_offset, is_stored desc
        ) as copy_rank,
        -- almost always false: only conflicting copies name another order
        min(order_id) over by_event <> max(order_id) over by_event
        or bool_or(other_order_ids is not null) over by_event as names_other_orders,
        array_agg(order_id) over by_event as copy_order_ids,
        array_agg(other_order_ids) filter (where other_order_ids is not null)
            over by_event as named_order_id_lists

    from candidates
    window by_event as (partition by event_id)

),

winners as (

    select
        ranked.topic,
        ranked.kafka_partition,
        ranked.kafka_offset,
        ranked.is_stored,
        ranked.other_order_ids as stored_other_order_ids,
        -- the orders any copy names (the stored row's list stands for the copies before), but
        -- this one's
        case when ranked.names_other_orders then (
            select nullif(
                jsonb_agg(distinct named.order_id order by named.order_id) - ranked.order_id, '[]'
            )
            from (
                select unnest(ranked.copy_order_ids)
                union all
                select listed.order_id
                from unnest(ranked.named_order_id_lists) as lists (order_ids)
                cross join lateral jsonb_array_elements_text(lists.order_ids) as listed (order_id)
            ) as named (order_id)
        ) end as other_order_ids

    from ranked
    where ranked.copy_rank = 1

),

-- rows to write: new events, an earlier copy that committed late, or another order named
new_winners as (

    select * from winners
    where not is_stored or other_order_ids is distinct from stored_other_order_ids

),

winning_copies as (

    select
        stg_order_events.*,
        new_winners.other_order_ids

    from new_winners
    -- one primary-key probe per winner, however far apart their landings are, and whatever
    -- Postgres estimates for new_winners
    cross join lateral (
        select * from {{ ref('stg_order_events') }} as winning_copy
        where winning_copy.topic = new_winners.topic
            and winning_copy.kafka_partition = new_winners.kafka_partition
            and winning_copy.kafka_offset = new_winners.kafka_offset
        offset 0
    ) as stg_order_events

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
        winning_copies.other_order_ids,
        -- taken after serialize_incremental_runs() granted its lock; see that macro
        statement_timestamp() as transformed_at

    from winning_copies
    left join customers
        on winning_copies.customer_id = customers.customer_id

)

select * from enriched
