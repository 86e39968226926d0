{#
    pre_hook of the incremental marts: a transaction-scoped advisory lock, one for the whole
    project, so two overlapping dbt invocations (a Dagster run and `orderflow catch-up`, say) run
    the incremental models one after the other instead of interleaving. The models stamp their rows
    with statement_timestamp(), taken after this lock is granted, which is what makes the
    "changed since my last run" watermarks of order_status and order_status_history exact.
#}
{% macro serialize_incremental_runs() -%}
    select pg_advisory_xact_lock(hashtext('orderflow.dbt.incremental_marts'))
{%- endmacro %}
