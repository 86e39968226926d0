-- Every order's status, last_event_id and event_count agree with its distinct events in
-- order_events: the status is the one of the latest event by (event timestamp, event_id).
{{ config(meta={'dagster': {'ref': {'name': 'order_status'}}}) }}

with

-- the latest distinct event of each order; order_events' (order_id, event_ts_ms desc,
-- event_id desc) index serves this order
last_events as (

    select distinct on (order_id)
        order_id,
        event_id,
        {{ event_status('event_type') }} as status

    from {{ ref('order_events') }}
    order by order_id, event_ts_ms desc, event_id desc

),

event_counts as (

    select
        order_id,
        count(*) as event_count

    from {{ ref('order_events') }}
    group by order_id

),

mismatches as (

    select
        order_status.order_id,
        order_status.status,
        last_events.status as expected_status,
        order_status.last_event_id,
        last_events.event_id as expected_last_event_id,
        order_status.event_count,
        event_counts.event_count as expected_event_count

    from {{ ref('order_status') }} as order_status
    inner join last_events
        on order_status.order_id = last_events.order_id
    inner join event_counts
        on order_status.order_id = event_counts.order_id
    where order_status.status is distinct from last_events.status
        or order_status.last_event_id is distinct from last_events.event_id
        or order_status.event_count is distinct from event_counts.event_count

)

select * from mismatches
