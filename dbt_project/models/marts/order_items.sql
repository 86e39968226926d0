-- The line items of each distinct OrderCreated event, one row per line, enriched with the product
-- catalog. A view over order_events: always consistent with it, and nothing to keep incremental.
-- A filter on transformed_at (its data tests, macros/data_test_scope.sql) reaches order_events'
-- transformed_at index.

{{ config(materialized='view') }}

with

order_created_events as (

    select
        event_id,
        order_id,
        customer_id,
        currency,
        event_at,
        items,
        transformed_at

    from {{ ref('order_events') }}
    where event_type = 'OrderCreated'

),

lines as (

    select
        order_created_events.event_id,
        order_created_events.order_id,
        order_created_events.customer_id,
        order_created_events.currency,
        order_created_events.event_at as ordered_at,
        line.position::integer as line_number,
        line.item ->> 'sku' as sku,
        -- a JSON number is always a numeric; beyond 10^15 (lines landed before the contract
        -- bounded quantities) it is null, so that line_total stays finite whatever landed
        case
            when jsonb_typeof(line.item -> 'qty') = 'number'
                then
                    case
                        when abs((line.item -> 'qty')::numeric) < 1e15
                            then (line.item -> 'qty')::numeric
                    end
        end as qty,
        {{ json_numeric("line.item -> 'unit_price'") }} as unit_price,
        order_created_events.transformed_at

    from order_created_events
    cross join lateral jsonb_array_elements(order_created_events.items)
        with ordinality as line (item, position)

),

products as (

    select * from {{ ref('products') }}

),

enriched as (

    select
        lines.event_id,
        lines.order_id,
        lines.line_number,
        lines.customer_id,
        lines.ordered_at,
        lines.sku,
        products.name as product_name,
        products.category as product_category,
        lines.qty,
        lines.unit_price,
        products.unit_price as list_price,
        lines.currency,
        lines.qty * lines.unit_price as line_total,
        lines.transformed_at

    from lines
    left join products
        on lines.sku = products.sku

)

select * from enriched
