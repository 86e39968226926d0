"""A dbt model added downstream of order_status becomes a Dagster asset with no Python change:
the worked example of docs/dbt.md, added to a copy of the project, is an asset of the marts
group (which orderflow_dbt_job builds) that depends on order_status. Needs no database: the
definitions load from `dbt parse`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "dbt.md"
SECTION = "## Example: a mart downstream of `order_status`"

# what the definitions say about the new model, printed by a fresh interpreter, since the
# project directory is read when orderflow_dagster.transform.dbt is imported
PROBE = """
import json
from dagster import AssetKey
from orderflow_dagster.definitions import defs
spec = {s.key: s for s in defs.resolve_all_asset_specs()}[AssetKey(["orders_per_status_daily"])]
job = defs.resolve_job_def("orderflow_dbt_job")
print(json.dumps({
    "deps": sorted(d.asset_key.to_user_string() for d in spec.deps),
    "group": spec.group_name,
    "columns": sorted(c.name for c in spec.metadata["dagster/column_schema"].columns),
    "in_job": AssetKey(["orders_per_status_daily"]) in job.asset_layer.selected_asset_keys,
}))
"""


def doc_example() -> dict[str, str]:
    """The example's files, by name, from the doc's section."""
    section = DOC.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"`(models/[^`]+)`\n\n```\w+\n(.*?)```", section, flags=re.DOTALL)
    return dict(blocks)


def test_doc_example_has_a_model_and_its_yml() -> None:
    assert sorted(doc_example()) == [
        "models/marts/orders_per_status_daily.sql",
        "models/marts/orders_per_status_daily.yml",
    ]


def test_model_downstream_of_order_status_is_an_asset_without_python(tmp_path: Path) -> None:
    project = tmp_path / "dbt_project"
    shutil.copytree(REPO / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs"))
    for name, text in doc_example().items():
        (project / name).write_text(text)
    env = os.environ | {
        "ORDERFLOW_DBT_PROJECT_DIR": str(project),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {
        "deps": ["order_status"],
        "group": "marts",
        "columns": ["last_event_day", "orders", "status"],
        "in_job": True,
    }
    # the repository's own project is untouched
    assert not (REPO / "dbt_project" / "models" / "marts" / "orders_per_status_daily.sql").exists()
