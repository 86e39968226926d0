{#
    pre_hook of the incremental marts: it starts the model's transaction itself, and in it

    1. Read committed, whatever the session's or the database's default: every statement of the
       model then reads what was committed when it began, so the model's statements, which run
       after step 2, see every run that committed before this one got its turn. Under repeatable
       read the snapshot would be taken by the first query, before the lock wait, and would miss
       a run that committed during the wait although this run stamps its rows later. SET
       TRANSACTION would fail when dbt has already read in the transaction it opened (it drops
       the relations a killed build left behind there), so the hook commits what dbt ran before
       it and begins the transaction with the isolation level it needs; dbt's own COMMIT or
       ROLLBACK then ends that one. (A before_begin hook cannot do it: after its COMMIT, dbt's
       psycopg2 connection believes a transaction is still open and runs every later statement
       of the model in a transaction of its own.)
    2. A transaction-scoped advisory lock, one for the whole project, so two overlapping dbt
       invocations (a Dagster run and `orderflow catch-up`, say) run the incremental models one
       after the other instead of interleaving. The models stamp their rows with
       statement_timestamp(), taken after this lock is granted, which is what makes the
       "changed since my last run" watermarks of order_events, order_status and
       order_status_history exact.
    3. A row in incremental_runs (record_incremental_run below): which model ran, when it got the
       lock and the snapshot it then read in. event_copies reads raw by it; `orderflow verify`
       compares each mart with what its last completed run could see. The row commits or rolls
       back with the model's rows.

    One query string: statement_timestamp() in it would be its arrival, before the lock wait, so
    the run's time is clock_timestamp().
#}
{% macro serialize_incremental_runs() -%}
    commit;
    begin isolation level read committed;
    select pg_advisory_xact_lock(hashtext('orderflow.dbt.incremental_marts'));
    {{ record_incremental_run() }}
{%- endmacro %}


{#- The table of incremental model runs, in the schema of the model being built. -#}
{% macro incremental_runs_relation() -%}
    {{ return(api.Relation.create(
        database=this.database, schema=this.schema, identifier='incremental_runs'
    )) }}
{%- endmacro %}


{#
    Created by the first run that needs it (under the lock, so never twice at once). Only the
    newest rows of each model are kept: the last run is what counts, the few before it are for
    whoever looks. xact_id tells a run's own row apart from its predecessors'.
#}
{% macro record_incremental_run() -%}
    {%- set runs = incremental_runs_relation() -%}
    create table if not exists {{ runs }} (
        id bigint generated always as identity primary key,
        model text not null,
        started_at timestamptz not null,
        read_snapshot pg_snapshot not null,
        xact_id xid8 not null default pg_current_xact_id()
    );
    insert into {{ runs }} (model, started_at, read_snapshot)
    values ('{{ this.identifier }}', clock_timestamp(), pg_current_snapshot());
    delete from {{ runs }}
    where model = '{{ this.identifier }}'
        and id < (
            select min(id) from (
                select id from {{ runs }}
                where model = '{{ this.identifier }}'
                order by id desc
                limit 20
            ) as newest
        );
{%- endmacro %}


{#-
    The snapshot the previous completed run of this model recorded (a scalar subquery), or, when
    there is none (first run since incremental_runs was created, or it was dropped), a snapshot in
    which nothing is visible, so that the caller reads everything.
-#}
{% macro previous_run_snapshot() -%}
    coalesce(
        (
            select read_snapshot from {{ incremental_runs_relation() }}
            where model = '{{ this.identifier }}' and xact_id <> pg_current_xact_id()
            order by id desc
            limit 1
        ),
        '1:1:'::pg_snapshot
    )
{%- endmacro %}
