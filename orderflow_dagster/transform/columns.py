"""Column schema and lineage on the dbt asset's materializations.

dagster-dbt reads each built model's columns from the database and, with sqlglot, which upstream
columns each is computed from. Two gaps are closed here:

- It looks a relation up by the database and schema of the manifest the definitions were loaded
  from, parsed with whatever ORDERFLOW_ANALYTICS_SCHEMA / ORDERFLOW_PG_DATABASE held then. The
  build's own manifest (written by dbt before it runs a node) names the relations it builds.
- The schema it reads from the database has types but no descriptions: they are added from the
  model's yml, so an operator reads what a column means next to its type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from dagster import TableColumn, TableSchema, TableSchemaMetadataValue
from dagster_dbt.core.dbt_cli_invocation import DbtCliInvocation
from dagster_dbt.core.dbt_event_iterator import DbtEventIterator

COLUMN_METADATA_ENV_VAR = "ORDERFLOW_DBT_COLUMN_METADATA"
COLUMN_SCHEMA = "dagster/column_schema"
# off: nothing at run time (the asset's definition already shows each model's columns with the
# types and descriptions of its yml); schema: each model's columns as the database has them;
# lineage: also which upstream columns each is computed from (sqlglot over the compiled SQL).
# Either adds a catalog query per model and its parents to every build, on the freshness path.
LEVELS = ("off", "schema", "lineage")
DEFAULT_LEVEL = "off"


def column_metadata_level() -> str:
    """What the dbt asset reports about columns with each materialization."""
    level = (os.environ.get(COLUMN_METADATA_ENV_VAR) or DEFAULT_LEVEL).strip().lower()
    if level not in LEVELS:
        choices = ", ".join(LEVELS)
        raise ValueError(f"{COLUMN_METADATA_ENV_VAR} must be one of {choices}, got {level!r}")
    return level


def dbt_build_events(invocation: DbtCliInvocation) -> Iterator[Any]:
    """The invocation's events; each model's carrying its columns (described) and, at level
    `lineage`, their lineage."""
    level = column_metadata_level()
    if level == "off":
        yield from invocation.stream()
        return
    events = DbtEventIterator(_reading_built_manifest(invocation), invocation)
    for event in events.fetch_column_metadata(with_column_lineage=level == "lineage"):
        yield _described(event, invocation.manifest)


def _reading_built_manifest(invocation: DbtCliInvocation) -> Iterator[Any]:
    swapped = False
    for event in invocation.stream():
        if not swapped:
            # dbt writes the manifest once it has parsed, before the first node's result
            built = invocation.target_path / "manifest.json"
            if built.exists():
                invocation.manifest = json.loads(built.read_text())
            swapped = True
        yield event


def _described(event: Any, manifest: Mapping[str, Any]) -> Any:
    metadata = getattr(event, "metadata", None) or {}
    schema = metadata.get(COLUMN_SCHEMA)
    unique_id = metadata.get("unique_id")
    if schema is None or unique_id is None:
        return event
    node = manifest["nodes"].get(unique_id.value) or {}
    declared = node.get("columns", {})
    columns = [
        TableColumn(
            name=column.name,
            type=column.type,
            description=(declared.get(column.name) or {}).get("description") or None,
            constraints=column.constraints,
            tags=column.tags,
        )
        for column in schema.value.columns
    ]
    described = TableSchemaMetadataValue(TableSchema(columns=columns))
    return event.with_metadata({**metadata, COLUMN_SCHEMA: described})
