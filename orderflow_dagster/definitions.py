"""The Dagster code location: `dagster dev -m orderflow_dagster.definitions` (or workspace.yaml)."""

from __future__ import annotations

from dagster import Definitions

from orderflow_dagster.defs.assets import raw_order_events
from orderflow_dagster.defs.resources import resources_from_env
from orderflow_dagster.defs.sensors import kafka_offset_ranges_sensor

defs = Definitions(
    assets=[raw_order_events],
    sensors=[kafka_offset_ranges_sensor],
    resources=resources_from_env(),
)
