"""Every model and seed documents every column it has, so the Dagster UI (column schema) and
dbt docs tell an operator what each column means. Pure: reads the manifest (`dbt parse`, no
database) and the models' SQL.

A model with an enforced contract declares its columns, and dbt fails the build when its SQL
returns others; for the rest, the SQL's output columns are read here with sqlglot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
import sqlglot
from jinja2 import meta
from sqlglot import exp

from orderflow_dagster.transform.dbt import orderflow_dbt_project


def _manifest() -> dict[str, Any]:
    return json.loads(Path(orderflow_dbt_project.manifest_path).read_text())


MANIFEST = _manifest()
NODES = [node for node in MANIFEST["nodes"].values() if node["resource_type"] in ("model", "seed")]
_JINJA = jinja2.Environment()


def sql_output_columns(raw_code: str) -> list[str]:
    """The columns a model's SQL returns: its final select's, following `select *` through the
    CTEs. Macros render as `null`, which leaves every projection's name as written."""
    names = meta.find_undeclared_variables(_JINJA.parse(raw_code))
    context: dict[str, Any] = {name: (lambda *_a, **_k: "null") for name in names}
    context |= {
        "ref": lambda *args, **_k: args[-1],
        "source": lambda source, table: f"{source}.{table}",
        "config": lambda *_a, **_k: "",
        "is_incremental": lambda: False,
    }
    tree = sqlglot.parse_one(_JINJA.from_string(raw_code).render(context), read="postgres")
    ctes = {cte.alias: cte.this for cte in tree.find_all(exp.CTE)}
    select = tree
    while select.named_selects == ["*"]:
        source = select.args.get("from_") or select.args["from"]
        select = ctes[source.this.name]
    return select.named_selects


def test_sql_output_columns_follows_select_star_through_ctes() -> None:
    code = (
        "{{ config(materialized='view') }} with a as (select x, y as z from {{ ref('t') }}),"
        " final as (select * from a) select * from final"
    )
    assert sql_output_columns(code) == ["x", "z"]


@pytest.mark.parametrize("node", NODES, ids=[node["name"] for node in NODES])
def test_every_column_is_declared_and_described(node: dict[str, Any]) -> None:
    declared = list(node["columns"])
    assert node["description"].strip(), f"{node['name']} has no description"
    if node["resource_type"] == "seed":
        path = Path(orderflow_dbt_project.project_dir) / node["original_file_path"]
        with path.open(newline="") as f:
            actual = next(csv.reader(f))
    elif node["config"]["contract"]["enforced"]:
        actual = declared  # dbt fails the build if the SQL returns other columns
    else:
        actual = sql_output_columns(node["raw_code"])
    assert declared == actual, f"{node['name']}: the yml's columns differ from the SQL's"
    undescribed = [name for name, col in node["columns"].items() if not col["description"].strip()]
    assert not undescribed, f"{node['name']}: columns without a description: {undescribed}"
