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

ranked_events as (

    select
        *,
        {{ event_status('event_type') }} as status,
        row_number() over (
            partition by order_id
            order by event_ts_ms desc, event_id desc
        ) as recency_rank,
        row_number() over (
            partition by order_id, event_type
            order by event_ts_ms, event_id
        ) as type_rank

    from order_events

),

latest_events as (

    select * from ranked_events
    where recency_rank = 1

),

-- if several distinct OrderCreated events exist, the earliest one describes the order
creations as (

    select * from ranked_events
    where event_type = 'OrderCreated' and type_rank = 1

),

-- the first time the order reached each status
milestones as (

    select
        order_id,
        count(*) as event_count,
        min(event_at) filter (where event_type = 'OrderCreated') as created_at,
        min(event_at) filter (where event_type = 'PaymentProcessed') as paid_at,
        min(event_at) filter (where event_type = 'ItemShipped') as shipped_at,
        min(event_at) filter (where event_type = 'OrderDelivered') as delivered_at,
        min(event_at) filter (where event_type = 'OrderCancelled') as cancelled_at

    from order_events
    group by order_id

),

final as (

    select
        milestones.order_id,
        latest_events.status,
        creations.customer_id,
        creations.customer_name,
        creations.customer_segment,
        creations.order_total,
        creations.currency,
        creations.channel,
        milestones.created_at,
        milestones.paid_at,
        milestones.shipped_at,
        milestones.delivered_at,
        milestones.cancelled_at,
        latest_events.event_id as last_event_id,
        latest_events.event_type as last_event_type,
        latest_events.event_at as last_event_at,
        latest_events.trace_id as last_trace_id,
        milestones.event_count,
        -- when this row was last recomputed; taken after serialize_incremental_runs()'s lock
        statement_timestamp() as updated_at

    from milestones
    inner join latest_events
        on milestones.order_id = latest_events.order_id
    left join creations
        on milestones.order_id = creations.order_id

)

select * from final
