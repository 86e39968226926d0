-- order_status has exactly one row per distinct order id of order_events: an order missing from
-- order_status or a row for an order without events fails the test.
{{ config(meta={'dagster': {'ref': {'name': 'order_status'}}}) }}

with

event_orders as (

    select distinct order_id from {{ ref('order_events') }}

),

status_orders as (

    select order_id, count(*) as rows_per_order
    from {{ ref('order_status') }}
    group by order_id

),

mismatches as (

    select
        coalesce(event_orders.order_id, status_orders.order_id) as order_id,
        event_orders.order_id is not null as has_events,
        coalesce(status_orders.rows_per_order, 0) as rows_per_order

    from event_orders
    full outer join status_orders
        on event_orders.order_id = status_orders.order_id

)

select * from mismatches
where not has_events or rows_per_order <> 1
