{#
    Generic test: no two rows share the same values in all of `combination_of_columns` (a
    composite key). Written here because `dbt deps` (dbt_utils) is not available offline.
#}
{% test unique_combination_of_columns(model, combination_of_columns) %}

with

grouped as (

    select
        {{ combination_of_columns | join(', ') }},
        count(*) as copies

    from {{ model }}
    group by {{ combination_of_columns | join(', ') }}

)

select * from grouped
where copies > 1

{% endtest %}
