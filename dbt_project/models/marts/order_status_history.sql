-- The status transitions of each order: its distinct events in (event timestamp, event_id) order,
-- keeping those that change the status. sequence_number counts the transitions from 1.
--
-- Incremental: like order_status, the orders touched since the last run are recomputed whole and
-- replace their previous rows (delete+insert on order_id).

{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='order_id',
        on_schema_change='fail',
        pre_hook="{{ serialize_incremental_runs() }}",
        indexes=[
            {'columns': ['event_id'], 'unique': true},
            {'columns': ['order_id', 'sequence_number'], 'unique': true},
            {'columns': ['updated_at']},
        ],
    )
}}

with

{% if is_incremental() %}

watermark as materialized (

    select coalesce(max(updated_at), '-infinity'::timestamptz) as updated_since
    from {{ this }}

),

touched_orders as materialized (

    select distinct order_id
    from {{ ref('order_events') }}
    where transformed_at > (select updated_since from watermark)

),

{% endif %}

order_events as (

    {% if is_incremental() %}
    -- one index probe per touched order; offset 0 keeps Postgres from turning this back into a
    -- hash join that scans all of order_events
    select touched_events.*
    from touched_orders
    cross join lateral (
        select * from {{ ref('order_events') }} as all_events
        where all_events.order_id = touched_orders.order_id
        offset 0
    ) as touched_events
    {% else %}
    select * from {{ ref('order_events') }}
    {% endif %}

),

event_statuses as (

    select
        order_id,
        event_id,
        event_ts_ms,
        event_at,
        {{ event_status('event_type') }} as status

    from order_events

),

with_previous as (

    select
        *,
        lag(status) over (
            partition by order_id
            order by event_ts_ms, event_id
        ) as previous_status

    from event_statuses

),

transitions as (

    select
        order_id,
        event_id,
        status,
        previous_status,
        event_at as transitioned_at,
        row_number() over (
            partition by order_id
            order by event_ts_ms, event_id
        ) as sequence_number,
        statement_timestamp() as updated_at

    from with_previous
    where previous_status is distinct from status

)

select * from transitions
