"""Raw landed events -> dbt models: the dbt project's Dagster assets and a headless runner."""

from orderflow_dagster.transform.dbt import (
    OrderflowDbtTranslator,
    dbt_env_from_dsn,
    dbt_executable,
    dbt_resource,
    orderflow_dbt_models,
    orderflow_dbt_project,
    run_dbt_build,
)

__all__ = [
    "OrderflowDbtTranslator",
    "dbt_env_from_dsn",
    "dbt_executable",
    "dbt_resource",
    "orderflow_dbt_models",
    "orderflow_dbt_project",
    "run_dbt_build",
]
