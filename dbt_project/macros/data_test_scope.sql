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
      landed_within_lookback(column)       rows landed within var('landing_lookback') of the
                                           newest landing in raw.ingest_ledger: the window the
                                           incremental models read again on every run
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


{#- The same for landed_within_lookback(): the newest landing minus var('landing_lookback'). -#}
{% macro landing_window_bound() -%}
    {%- set newest_landing -%}
        select max(landed_at) - interval '{{ var("landing_lookback") }}'
        from {{ source('raw', 'ingest_ledger') }}
    {%- endset -%}
    {{ return(scope_bound(newest_landing)) }}
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

    {%- for column in re.findall('landed_within_lookback\(\s*(\w+)\s*\)', where) -%}
        {%- set bound = landing_window_bound() -%}
        {%- set expanded.where = re.sub(
            'landed_within_lookback\(\s*' ~ column ~ '\s*\)', column ~ ' >= ' ~ bound, expanded.where
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
