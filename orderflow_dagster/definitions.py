"""The Dagster code location, served by `orderflow serve` (or `dagster dev -m
orderflow_dagster.definitions`, or workspace.yaml).

Lineage in the UI: raw_order_events (one partition per Kafka offset range) -> staging -> marts
-> orders_status_topic (the Kafka topic orders.status).

Every run executes in its run worker's process (`in_process_executor`): a landing run is one
step and a dbt build is one `dbt build`, so the default multiprocess executor would only pay a
second interpreter start and code-location import per run, for no parallelism.
"""

from dagster import Definitions, in_process_executor

from orderflow_dagster.defs.assets import raw_order_events
from orderflow_dagster.defs.checks import order_status_staleness
from orderflow_dagster.defs.publish import orders_status_topic
from orderflow_dagster.defs.resources import resources_from_env
from orderflow_dagster.defs.retention import partition_retention_sensor
from orderflow_dagster.defs.sensors import (
    dbt_after_landing_sensor,
    dbt_job,
    kafka_offset_ranges_sensor,
)
from orderflow_dagster.transform.dbt import dbt_resource, orderflow_dbt_models

defs = Definitions(
    assets=[raw_order_events, orderflow_dbt_models, orders_status_topic],
    asset_checks=[order_status_staleness],
    jobs=[dbt_job],
    sensors=[kafka_offset_ranges_sensor, dbt_after_landing_sensor, partition_retention_sensor],
    resources={**resources_from_env(), "dbt": dbt_resource()},
    executor=in_process_executor,
)
