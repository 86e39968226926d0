-- The status transitions of each order: its distinct events in (event timestamp, event_id) order,
-- keeping those that change the status. sequence_number counts the transitions from 1.
--
-- Incremental: like order_status, the orders touched since the last run are recomputed whole and
-- replace their previous rows, and a touched order with no event left loses its rows (the
-- replace_orders strategy): the event a transition row names is then never in two orders.
--
-- The keys ((order_id, sequence_number), the primary key, and event_id, unique), the not-null
-- columns and the accepted statuses are constraints of the model's contract
-- (order_status_history.yml), checked by Postgres on every insert.

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
