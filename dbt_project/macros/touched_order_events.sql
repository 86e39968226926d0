{#
    The CTEs shared by the per-order marts (order_status, order_status_history): on an
    incremental run, every event of the orders that order_events changed since this model last
    ran; on a full refresh, every event. Ends with a CTE named `order_events`.

    The orders touched are those of the order_events rows written since this model's newest
    stamp, and the other orders those rows name (other_order_ids): an event that moved to another
    order, because a copy ordered earlier committed later, must leave the order it was counted in.
    other_order_ids keeps every order any copy of the event names, so the order that lost it is
    recomputed even if the build that moved the event failed before this model ran, or the event
    moved twice since. An order left with no event has no row any more: the replace_orders
    strategy below deletes it.

    Incremental runs read the touched orders' events with one index probe per order: `offset 0`
    keeps Postgres from turning the lateral join back into a hash join that scans all of
    order_events.
#}
{% macro touched_order_events() %}

{% if is_incremental() %}

{{ touched_orders() }},

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


{#-
    CTEs `watermark` and `touched_orders` (one order_id per row): the orders to recompute, as of
    this model's newest stamp in {{ this }}.
-#}
{% macro touched_orders() %}

watermark as materialized (

    select coalesce(max(updated_at), '-infinity'::timestamptz) as updated_since
    from {{ this }}

),

touched_orders as materialized (

    select distinct touched.order_id
    from {{ ref('order_events') }} as written
    cross join lateral (
        select written.order_id
        union all
        select jsonb_array_elements_text(written.other_order_ids)
    ) as touched (order_id)
    where written.transformed_at > (select updated_since from watermark)

)

{% endmacro %}


{#
    Incremental strategy `replace_orders` of the per-order marts: delete+insert on order_id, where
    the rows deleted are those of the orders the model recomputed (its new rows) and of the
    touched orders that have no event left, for which it computed nothing. Runs before the insert,
    in the model's transaction, under serialize_incremental_runs()' lock: {{ this }} and
    order_events are as the model's statement read them, so touched_orders() is the same set.
#}
{% macro get_incremental_replace_orders_sql(arg_dict) %}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set columns = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}

    with {{ touched_orders() }}

    delete from {{ target }}
    where order_id in (
        select order_id from {{ arg_dict['temp_relation'] }}
        union all
        select touched_orders.order_id from touched_orders
        where not exists (
            select from {{ ref('order_events') }} as remaining
            where remaining.order_id = touched_orders.order_id
        )
    );

    insert into {{ target }} ({{ columns }})
    select {{ columns }} from {{ arg_dict['temp_relation'] }}
{% endmacro %}
