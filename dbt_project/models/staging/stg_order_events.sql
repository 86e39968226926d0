-- Every landed copy of every event, one row per raw row, with the envelope parsed into typed
-- columns. Payloads are upcast to the latest schema_version and only known fields are read, so
-- unknown fields are ignored. Deduplication happens downstream, in order_events.
--
-- Every step is a row-by-row projection of the source, so a filter on xact_id (what event_copies
-- has not read yet) reaches the BRIN index on raw.order_events(xact_id), and one on the
-- coordinates (the winners order_events writes) raw's primary key.

with

source as (

    select * from {{ source('raw', 'order_events') }}

),

renamed as (

    select
        event_id,
        aggregate_id as order_id,
        event_type,
        schema_version,
        event_ts as event_at,
        event_ts_ms,
        payload,
        trace_id,
        topic,
        kafka_partition,
        kafka_offset,
        landed_at,
        xact_id,
        -- a copy's content: the envelope fields the producer controls. jsonb text sorts keys and
        -- drops insignificant whitespace, and raw.canonical_json_text (the landing's schema.sql)
        -- writes numbers without trailing zeros, so numerically equal payloads hash equally.
        md5(
            raw.canonical_json_text(
                jsonb_build_array(event_type, aggregate_id, event_ts_ms, schema_version, payload)
            )
        ) as content_hash

    from source

),

upcast as (

    -- schema_version 2 of OrderCreated added `channel`; every v1 order came from the web shop
    select
        *,
        case
            when event_type = 'OrderCreated' and schema_version = 1 then 'web'
            when event_type = 'OrderCreated' then payload ->> 'channel'
        end as channel

    from renamed

),

typed as (

    -- known fields only, each read from the event types that carry it
    select
        event_id,
        order_id,
        event_type,
        schema_version,
        event_at,
        event_ts_ms,

        case when event_type = 'OrderCreated' then payload ->> 'customer_id' end as customer_id,
        -- cast outside the case, which drops the type modifier; the marts' contracts declare it
        (case
            when event_type = 'OrderCreated' then {{ json_numeric("payload -> 'order_total'") }}
        end)::numeric(12, 2) as order_total,
        case
            when event_type in ('OrderCreated', 'PaymentProcessed') then payload ->> 'currency'
        end as currency,
        channel,
        case
            when event_type = 'OrderCreated' and jsonb_typeof(payload -> 'items') = 'array'
                then (
                    select
                        coalesce(
                            jsonb_agg(
                                jsonb_build_object(
                                    'sku', item.value -> 'sku',
                                    'qty', item.value -> 'qty',
                                    'unit_price', item.value -> 'unit_price'
                                )
                                order by item.position
                            ),
                            '[]'::jsonb
                        )
                    from jsonb_array_elements(payload -> 'items')
                        with ordinality as item (value, position)
                )
        end as items,
        case
            when event_type = 'OrderCreated' and jsonb_typeof(payload -> 'items') = 'array'
                then jsonb_array_length(payload -> 'items')
        end as item_count,

        case when event_type = 'PaymentProcessed' then payload ->> 'payment_id' end as payment_id,
        (case
            when event_type = 'PaymentProcessed' then {{ json_numeric("payload -> 'amount'") }}
        end)::numeric(12, 2) as payment_amount,
        case when event_type = 'PaymentProcessed' then payload ->> 'method' end as payment_method,

        case when event_type = 'ItemShipped' then payload ->> 'shipment_id' end as shipment_id,
        case when event_type = 'ItemShipped' then payload ->> 'carrier' end as carrier,
        case
            when event_type = 'ItemShipped' then payload ->> 'tracking_number'
        end as tracking_number,

        case when event_type = 'OrderDelivered' then payload ->> 'signed_by' end as signed_by,

        case when event_type = 'OrderCancelled' then payload ->> 'reason' end as cancel_reason,

        trace_id,
        topic,
        kafka_partition,
        kafka_offset,
        landed_at,
        xact_id,
        content_hash

    from upcast

)

select * from typed
