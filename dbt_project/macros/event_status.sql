{#
    The order status an event puts its order in. The status of an order is the status of its latest
    distinct event by (event timestamp, event_id), whatever order the events arrived in.
#}
{% macro event_status(event_type) -%}
    case {{ event_type }}
        when 'OrderCreated' then 'created'
        when 'PaymentProcessed' then 'paid'
        when 'ItemShipped' then 'shipped'
        when 'OrderDelivered' then 'delivered'
        when 'OrderCancelled' then 'cancelled'
    end
{%- endmacro %}
