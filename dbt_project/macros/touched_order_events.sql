{#
    The CTEs shared by the per-order marts (order_status, order_status_history): on an
    incremental run, every event of the orders that order_events changed since this model last
    ran; on a full refresh, every event. Ends with a CTE named `order_events`.

    Incremental runs read the touched orders' events with one index probe per order: `offset 0`
    keeps Postgres from turning the lateral join back into a hash join that scans all of
    order_events.
#}
{% macro touched_order_events() %}

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

)

{% endmacro %}
