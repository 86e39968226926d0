{#
    A jsonb value as numeric(precision, scale), or null when it is absent, JSON null, not a
    number, or does not fit numeric(precision, scale) once rounded to `scale` decimals
    (9999999999.995 rounds to 10000000000.00, which numeric(12, 2) cannot hold). Accepts JSON
    numbers and numeric strings ("12.50"), the two ways producers send money; a string is read
    only when numeric's input surely takes it: ASCII digits and whitespace, at most 1000
    characters. Never raises, so one odd payload, landed before the contract bounded money or
    since, cannot fail a model build or a read of a view.

    Each cast sits in a CASE branch of its own: only CASE promises not to evaluate what its
    conditions exclude.
#}
{% macro json_numeric(json_value, precision=12, scale=2) -%}
    {#- the least magnitude that rounds beyond the type: 9999999999.995 for numeric(12, 2) -#}
    {%- set overflow = '9' * (precision - scale) ~ '.' ~ '9' * scale ~ '5' -%}
    {%- set text = '(' ~ json_value ~ " #>> '{}')" -%}
    case jsonb_typeof({{ json_value }})
        when 'number' then
            case
                when abs(({{ json_value }})::numeric) < {{ overflow }}
                    then ({{ json_value }})::numeric({{ precision }}, {{ scale }})
            end
        when 'string' then
            case
                when length({{ text }}) <= 1000
                    and {{ text }} ~ '^[ \t\n\r]*-?[0-9]+(\.[0-9]+)?[ \t\n\r]*$'
                    then
                        case
                            when abs({{ text }}::numeric) < {{ overflow }}
                                then {{ text }}::numeric({{ precision }}, {{ scale }})
                        end
            end
    end
{%- endmacro %}
