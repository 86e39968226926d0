-- Every order's status, last_event_id and event_count agree with its distinct events in
-- order_events: the status is the one of the latest event by (event timestamp, event_id).
-- Checks the orders this build recomputed, or every order (macros/data_test_scope.sql).
{{ config(meta={'dagster': {'ref': {'name': 'order_status'}}}) }}

with

recomputed_orders as (

    select
        order_id,
        status,
        last_event_id,
        event_count

    from {{ ref('order_status') }}
    where updated_at >= {{ latest_write_bound(ref('order_status'), 'updated_at') }}

),

-- each order's latest event and event count, by order_events' (order_id, event_ts_ms desc,
-- event_id desc) index: one probe per order, and no join on order_id, whatever Postgres
-- estimates for the orders above
expected as (

    select
        recomputed_orders.*,
        {{ event_status('last_event.event_type') }} as expected_status,
        last_event.event_id as expected_last_event_id,
        (
            select count(*)
            from {{ ref('order_events') }} as order_events
            where order_events.order_id = recomputed_orders.order_id
        ) as expected_event_count

    from recomputed_orders
    cross join lateral (
        select
            order_events.event_id,
            order_events.event_type

        from {{ ref('order_events') }} as order_events
        where order_events.order_id = recomputed_orders.order_id
        order by order_events.event_ts_ms desc, order_events.event_id desc
        limit 1
    ) as last_event

),

mismatches as (

    select * from expected
    where status is distinct from expected_status
        or last_event_id is distinct from expected_last_event_id
        or event_count is distinct from expected_event_count

)

select * from mismatches
