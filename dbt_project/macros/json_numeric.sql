{#
    A jsonb value as numeric(precision, scale), or null when it is absent, JSON null or not a
    number. Accepts JSON numbers and numeric strings ("12.50"), the two ways producers send money.
    Never raises, so one odd payload cannot fail a model build.
#}
{% macro json_numeric(json_value, precision=12, scale=2) -%}
    case
        when jsonb_typeof({{ json_value }}) = 'number'
            or (
                jsonb_typeof({{ json_value }}) = 'string'
                and ({{ json_value }} #>> '{}') ~ '^\s*-?[0-9]+(\.[0-9]+)?\s*$'
            )
            then ({{ json_value }} #>> '{}')::numeric({{ precision }}, {{ scale }})
    end
{%- endmacro %}
