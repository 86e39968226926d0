-- One row per landed offset range [start_offset, end_offset), as written by the landing asset in
-- the same transaction as the rows of that range.

with

source as (

    select * from {{ source('raw', 'ingest_ledger') }}

),

renamed as (

    select
        topic,
        kafka_partition,
        start_offset,
        end_offset,
        end_offset - start_offset as offset_count,
        partition_key,
        messages_read,
        rows_landed,
        dead_letters,
        already_landed,
        run_id,
        landed_at,
        duration_ms

    from source

)

select * from renamed
