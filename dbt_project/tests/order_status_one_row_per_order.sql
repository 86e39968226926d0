-- order_status has exactly one row per distinct order id of order_events and none for an order
-- without events: an order missing from order_status, or a row left for an order whose events all
-- moved to another order, fails the test. Checks the orders of the events this build wrote (and
-- the orders those events name in other_order_ids, which may have lost them) and the orders it
-- recomputed, or every order (macros/data_test_scope.sql).
{{ config(meta={'dagster': {'ref': {'name': 'order_status'}}}) }}

with

orders_to_check as (

    select named.order_id
    from {{ ref('order_events') }} as written
    cross join lateral (
        select written.order_id
        union all
        select jsonb_array_elements_text(written.other_order_ids)
    ) as named (order_id)
    where written.transformed_at
        >= {{ latest_write_bound(ref('order_events'), 'transformed_at') }}

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
where rows_per_order <> (case when has_events then 1 else 0 end)
