"""The Dagster code location, served by `orderflow serve` (or `dagster dev -m
orderflow_dagster.definitions`, or workspace.yaml).

Lineage in the UI: raw_order_events (one partition per Kafka offset range) -> staging -> marts.
"""

from dagster import Definitions

from orderflow_dagster.defs.assets import raw_order_events
from orderflow_dagster.defs.resources import resources_from_env
from orderflow_dagster.defs.sensors import (
    dbt_after_landing_sensor,
    dbt_job,
    kafka_offset_ranges_sensor,
)
from orderflow_dagster.transform.dbt import dbt_resource, orderflow_dbt_models

defs = Definitions(
    assets=[raw_order_events, orderflow_dbt_models],
    jobs=[dbt_job],
    sensors=[kafka_offset_ranges_sensor, dbt_after_landing_sensor],
    resources={**resources_from_env(), "dbt": dbt_resource()},
)
