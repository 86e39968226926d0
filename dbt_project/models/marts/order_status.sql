-- One row per order: its current status and lifecycle timestamps.
--
-- The status is that of the order's latest distinct event by (event timestamp, event_id), so the
-- order in which events arrived does not matter. An order whose OrderCreated has not arrived yet
-- still has a row, with null customer and order fields.
--
-- Incremental: the orders touched by events order_events wrote since this model last ran (their
-- orders, and the orders an event may have moved from) are recomputed from all their events and
-- replace their previous rows; a touched order with no event left loses its row (the
-- replace_orders strategy, macros/touched_order_events.sql).
--
-- The key (order_id, the primary key), the not-null columns and the accepted statuses are
-- constraints of the model's contract (order_status.yml), checked by Postgres on every insert.

{{
    config(
        materialized='incremental',
        incremental_strategy='replace_orders',
        unique_key='order_id',
        on_schema_change='fail',
        pre_hook="{{ serialize_incremental_runs() }}",
        indexes=[
            {'columns': ['updated_at']},
        ],
    )
}}

with

-- order_events: the events of the orders to recompute (see the macro)
{{ touched_order_events() }},

-- one pass of window functions and no join: an incremental run's touched orders are a CTE whose
-- size Postgres cannot estimate, and a join planned for a handful of them as a nested loop over
-- CTE scans is quadratic in the orders touched
order_windows as (

    select
        *,
        {{ event_status('event_type') }} as status,
        row_number() over latest_first as recency_rank,
        count(*) over by_order as event_count,
        min(event_at) filter (where event_type = 'OrderCreated') over by_order as created_at,
        min(event_at) filter (where event_type = 'PaymentProcessed') over by_order as paid_at,
        min(event_at) filter (where event_type = 'ItemShipped') over by_order as shipped_at,
        min(event_at) filter (where event_type = 'OrderDelivered') over by_order as delivered_at,
        min(event_at) filter (where event_type = 'OrderCancelled') over by_order as cancelled_at,
        -- if several distinct OrderCreated events exist, the earliest one describes the order
        first_value(event_type) over creation_first as creation_event_type,
        first_value(customer_id) over creation_first as creation_customer_id,
        first_value(customer_name) over creation_first as creation_customer_name,
        first_value(customer_segment) over creation_first as creation_customer_segment,
        first_value(order_total) over creation_first as creation_order_total,
        first_value(currency) over creation_first as creation_currency,
        first_value(channel) over creation_first as creation_channel

    from order_events
    window
        by_order as (partition by order_id),
        latest_first as (partition by order_id order by event_ts_ms desc, event_id desc),
        creation_first as (
            partition by order_id
            order by event_type = 'OrderCreated' desc, event_ts_ms, event_id
            rows between unbounded preceding and unbounded following
        )

),

-- the order's latest event, carrying the order-wide columns
latest_events as (

    select
        *,
        creation_event_type = 'OrderCreated' as has_creation

    from order_windows
    where recency_rank = 1

),

final as (

    select
        order_id,
        status,
        -- null until the order's OrderCreated arrives
        case when has_creation then creation_customer_id end as customer_id,
        case when has_creation then creation_customer_name end as customer_name,
        case when has_creation then creation_customer_segment end as customer_segment,
        (case when has_creation then creation_order_total end)::numeric(12, 2) as order_total,
        case when has_creation then creation_currency end as currency,
        case when has_creation then creation_channel end as channel,
        created_at,
        paid_at,
        shipped_at,
        delivered_at,
        cancelled_at,
        event_id as last_event_id,
        event_type as last_event_type,
        event_at as last_event_at,
        trace_id as last_trace_id,
        event_count,
        -- when this row was last recomputed; taken after serialize_incremental_runs()'s lock
        statement_timestamp() as updated_at

    from latest_events

)

select * from final
