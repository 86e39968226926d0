{#
    Which rows the data tests of a routine (incremental) build check.

    A routine build checks the rows its incremental models just wrote, not every row ever written:
    the rows checked grow with the new events, not with the tables. Every row is still checked
    when it is written (by the build that wrote it), and keys need no scan at all: the incremental
    marts enforce them with Postgres constraints (model contracts, see docs/dbt.md). Every row is
    checked by
      - a full refresh (`--full-refresh`), and
      - any build with `--vars '{data_tests_scope: all}'` (schedule one, e.g. nightly, to re-check
        rows after a failed build or a manual edit).

    Generic tests opt in through their `where` config, with one of these pseudo-functions (dbt
    renders `where` when it parses the project, before any data exists, so get_where_subquery
    expands them when the test runs):

      written_in_latest_run(stamp)         rows whose statement_timestamp() column `stamp` is the
                                           newest of the tested model: every row the model's
                                           latest run wrote (one statement, one stamp). In a
                                           `dbt build`, only if that run belongs to this build:
                                           a build whose model wrote nothing checks nothing of
                                           it (not, say, all the rows of the last full refresh)
      written_in_latest_run(stamp, model)  the same, the newest `stamp` of `model`, in the tested
                                           relation's schema (for a view over that model)
      unread_by_event_copies(column)       raw rows whose transaction (`column`, their xact_id)
                                           had not committed in the snapshot event_copies last
                                           recorded: what its next run reads. In a `dbt build`
                                           the staging tests run before event_copies, so these
                                           are the rows this build models
      full_check_only()                    no rows in a routine build, every row in a full check:
                                           for a view that cannot be checked in part, whose
                                           test guards what holds by construction

    Singular tests call latest_write_bound() directly.
#}

{% macro data_tests_check_all() -%}
    {{ return(flags.FULL_REFRESH or var('data_tests_scope') == 'all') }}
{%- endmacro %}


{#-
    The oldest `stamp` the tests check: the newest one of `relation` (in a `dbt build`, and not
    older than the build's start), or -infinity (every row). When the test runs, the bound is looked up first and written into the test's SQL as a literal:
    Postgres estimates `stamp >= <subquery>` at a third of the table and would scan it all, while
    for a literal it sees from the index how few rows qualify.
-#}
{% macro latest_write_bound(relation, stamp) -%}
    {%- set newest = "(select max(" ~ stamp ~ ") from " ~ relation ~ ")" -%}
    {%- if flags.WHICH != 'build' or not execute -%}
        {{ return(scope_bound("select " ~ newest)) }}
    {%- endif -%}
    {#-
        When this build started, on the database's clock (which stamped the rows): dbt's
        run_started_at moved by the offset between dbt's clock, read just now, and the database's,
        read by the same statement. A second off for the round trip; re-checking rows written in
        that second before the build is harmless.
    -#}
    {%- set dbt_now = modules.datetime.datetime.now(modules.pytz.utc) -%}
    {%- set build_started = "clock_timestamp() - (timestamptz '" ~ dbt_now ~ "' - timestamptz '"
        ~ run_started_at ~ "') - interval '1 second'" -%}
    {{ return(scope_bound("select greatest(" ~ newest ~ ", " ~ build_started ~ ")")) }}
{%- endmacro %}


{#-
    The condition behind unread_by_event_copies(): `column` at or past the recorded snapshot's
    xmax, or one of the transactions running then, as literals (see latest_write_bound); `true`
    in a full check, or when event_copies has recorded no run yet (it then reads everything).
-#}
{% macro unread_by_event_copies(column) -%}
    {%- if data_tests_check_all() or not execute -%}
        {{ return('true') }}
    {%- endif -%}
    {#- event_copies' schema, from the graph: a ref() here would be a dependency the test lacks -#}
    {%- set event_copies = graph.nodes.values() | selectattr('resource_type', 'equalto', 'model')
        | selectattr('name', 'equalto', 'event_copies') | first -%}
    {%- set runs = api.Relation.create(
        database=event_copies.database, schema=event_copies.schema, identifier='incremental_runs'
    ) -%}
    {%- set exists_query -%}
        select to_regclass('{{ runs.schema }}.{{ runs.identifier }}') is not null
    {%- endset -%}
    {%- if not run_query(exists_query).columns[0].values()[0] -%}
        {{ return('true') }}
    {%- endif -%}
    {%- set snapshot_query -%}
        select pg_snapshot_xmax(read_snapshot)::text,
               array_to_string(array(select pg_snapshot_xip(read_snapshot)::text), ',')
        from {{ runs }}
        where model = 'event_copies'
        order by id desc
        limit 1
    {%- endset -%}
    {%- set recorded = run_query(snapshot_query) -%}
    {%- if recorded.rows | length == 0 -%}
        {{ return('true') }}
    {%- endif -%}
    {%- set xmax, running = recorded.rows[0][0], recorded.rows[0][1] -%}
    {%- set condition = column ~ ' >= ' ~ xmax -%}
    {%- if running -%}
        {%- set condition = condition ~ ' or ' ~ column ~ ' in (' ~ running ~ ')' -%}
    {%- endif -%}
    {{ return('(' ~ condition ~ ')') }}
{%- endmacro %}


{%- macro scope_bound(bound_query) -%}
    {%- if data_tests_check_all() -%}
        {{ return("'-infinity'::timestamptz") }}
    {%- elif not execute -%}
        {#- parsing: no database yet, the query itself stands in -#}
        {{ return("(" ~ bound_query ~ ")") }}
    {%- endif -%}
    {%- set bound = run_query("select (" ~ bound_query ~ ")::text").columns[0].values()[0] -%}
    {#- nothing written yet: check every row -#}
    {{ return("'" ~ (bound or "-infinity") ~ "'::timestamptz") }}
{%- endmacro %}


{% macro get_where_subquery(relation) -%}
    {%- set where = config.get('where', '') -%}
    {%- if not where -%}
        {{ return(relation) }}
    {%- endif -%}
    {%- set re = modules.re -%}
    {#- a namespace: a plain `set` inside a for loop does not outlive the iteration -#}
    {%- set expanded = namespace(where=where) -%}

    {%- for call in re.findall('written_in_latest_run\(\s*(\w+)\s*(?:,\s*(\w+)\s*)?\)', where) -%}
        {%- set stamp, model = call -%}
        {%- set stamped = relation if not model else api.Relation.create(
            database=relation.database, schema=relation.schema, identifier=model
        ) -%}
        {%- set expanded.where = re.sub(
            'written_in_latest_run\(\s*' ~ stamp ~ '\s*' ~ (',\s*' ~ model ~ '\s*' if model else '') ~ '\)',
            stamp ~ ' >= ' ~ latest_write_bound(stamped, stamp),
            expanded.where
        ) -%}
    {%- endfor -%}

    {%- for column in re.findall('unread_by_event_copies\(\s*(\w+)\s*\)', where) -%}
        {%- set expanded.where = re.sub(
            'unread_by_event_copies\(\s*' ~ column ~ '\s*\)',
            unread_by_event_copies(column),
            expanded.where
        ) -%}
    {%- endfor -%}

    {%- set expanded.where = expanded.where | replace(
        'full_check_only()', 'true' if data_tests_check_all() else 'false'
    ) -%}

    {%- set filtered -%}
        (select * from {{ relation }} where {{ expanded.where }}) dbt_subquery
    {%- endset -%}
    {{ return(filtered) }}
{%- endmacro %}
