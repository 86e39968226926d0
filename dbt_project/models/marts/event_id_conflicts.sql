-- Event ids landed in more than one version: copies that share an event_id but whose content
-- (content_hash) differs. order_events keeps the first copy landed; this model makes the others
-- visible instead of silently dropping them. Plain duplicates (identical copies, the normal result
-- of producer retries and replays) are not conflicts and are not listed.
--
-- A view over event_copies: nothing to build or keep incremental, always current; reading it
-- walks event_copies' (event_id, content_hash) index.

{{ config(materialized='view') }}

with

-- reads event_copies' (event_id, content_hash) index only
versions as (

    select
        event_id,
        count(*) as copies,
        count(distinct content_hash) as distinct_versions

    from {{ ref('event_copies') }}
    group by event_id
    having count(distinct content_hash) > 1

),

conflicting_copies as (

    select
        event_copies.event_id,
        event_copies.order_id,
        event_copies.content_hash,
        event_copies.topic,
        event_copies.kafka_partition,
        event_copies.kafka_offset,
        event_copies.landed_at,
        row_number() over (
            partition by event_copies.event_id
            order by
                event_copies.landed_at,
                event_copies.topic,
                event_copies.kafka_partition,
                event_copies.kafka_offset
        ) as landing_rank,
        count(*) over (partition by event_copies.event_id) as copies

    from {{ ref('event_copies') }} as event_copies
    inner join versions
        on event_copies.event_id = versions.event_id

),

order_ids as (

    select
        event_id,
        count(distinct order_id) as distinct_order_ids

    from conflicting_copies
    group by event_id

),

conflicts as (

    select
        versions.event_id,
        versions.copies,
        versions.distinct_versions,
        order_ids.distinct_order_ids,
        first_copy.order_id as first_order_id,
        first_copy.content_hash as first_content_hash,
        first_copy.topic as first_topic,
        first_copy.kafka_partition as first_kafka_partition,
        first_copy.kafka_offset as first_kafka_offset,
        first_copy.landed_at as first_landed_at,
        last_copy.content_hash as last_content_hash,
        last_copy.topic as last_topic,
        last_copy.kafka_partition as last_kafka_partition,
        last_copy.kafka_offset as last_kafka_offset,
        last_copy.landed_at as last_landed_at

    from versions
    inner join order_ids
        on versions.event_id = order_ids.event_id
    inner join conflicting_copies as first_copy
        on versions.event_id = first_copy.event_id
        and first_copy.landing_rank = 1
    inner join conflicting_copies as last_copy
        on versions.event_id = last_copy.event_id
        and last_copy.landing_rank = last_copy.copies

)

select * from conflicts
