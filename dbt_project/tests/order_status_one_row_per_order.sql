-- order_status has exactly one row per distinct order id of order_events: an order missing from
-- order_status or a row for an order without events fails the test. Checks the orders of the
-- events this build wrote and the orders it recomputed, or every order
-- (macros/data_test_scope.sql).
{{ config(meta={'dagster': {'ref': {'name': 'order_status'}}}) }}

with

orders_to_check as (

    select order_id from {{ ref('order_events') }}
    where transformed_at >= {{ latest_write_bound(ref('order_events'), 'transformed_at') }}

    union

    select order_id from {{ ref('order_status') }}
    where updated_at >= {{ latest_write_bound(ref('order_status'), 'updated_at') }}

),

-- one index probe per order into each table, whatever Postgres estimates for the orders above
checked_orders as (

    select
        orders_to_check.order_id,
        exists (
            select 1
            from {{ ref('order_events') }} as order_events
            where order_events.order_id = orders_to_check.order_id
        ) as has_events,
        (
            select count(*)
            from {{ ref('order_status') }} as order_status
            where order_status.order_id = orders_to_check.order_id
        ) as rows_per_order

    from orders_to_check

)

select * from checked_orders
where not has_events or rows_per_order <> 1
