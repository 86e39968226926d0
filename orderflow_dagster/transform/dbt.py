"""The dbt project (`dbt_project/`) as Dagster assets, and a headless way to run it.

- `orderflow_dbt_project`: the `DbtProject`. Its manifest is parsed once, by the first import that
  finds it missing or older than a project file (a source checkout), never per run. Deployments
  build it beforehand:
  `dagster-dbt project prepare-and-package --file orderflow_dagster/transform/dbt.py`, or simply
  `dbt parse --project-dir dbt_project --profiles-dir dbt_project` (no database needed).
- `orderflow_dbt_models`: every model, seed and test of the project as one `@dbt_assets`
  definition running `dbt build`; dbt tests are asset checks.
- `run_dbt_build`: `dbt build` as a subprocess, for `orderflow catch-up` and the tests. The
  crash point `in_dbt` (orderflow_dagster/faults.py) kills it and dbt halfway through the build.

dbt's profile (`dbt_project/profiles.yml`) reads ORDERFLOW_PG_* variables and
DBT_ENV_SECRET_ORDERFLOW_PG_PASSWORD; `dbt_env_from_dsn` derives them from ORDERFLOW_POSTGRES_DSN.
Both ways of running dbt also pin its sessions to READ COMMITTED, READ WRITE through PGOPTIONS
(`dbt_session_env`), whatever the database's defaults.
"""

# No `from __future__ import annotations`: Dagster inspects the asset function's annotations.
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, AssetKey, AssetSpec, FreshnessPolicy
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)
from packaging import version

from orderflow_dagster import faults
from orderflow_dagster.land.session import TRANSACTION_DEFAULTS, libpq_options, with_options
from orderflow_dagster.pools import DBT_POOL
from orderflow_dagster.settings import repo_root
from orderflow_dagster.transform.columns import dbt_build_events

PROJECT_DIR_ENV_VAR = "ORDERFLOW_DBT_PROJECT_DIR"
# the dbt project the assets are defined from and builds run in: this checkout's, or another
# (a fork with models of its own) named by ORDERFLOW_DBT_PROJECT_DIR, read once at import
DBT_PROJECT_DIR = Path(
    os.environ.get(PROJECT_DIR_ENV_VAR) or Path(__file__).resolve().parents[2] / "dbt_project"
).resolve()
DSN_ENV_VAR = "ORDERFLOW_POSTGRES_DSN"
# The asset, defined by the landing code, whose materializations write raw.order_events and, in
# the same transaction, raw.ingest_ledger.
RAW_ORDER_EVENTS_KEY = AssetKey(["raw_order_events"])
ORDER_STATUS_KEY = AssetKey(["order_status"])
# The dbt sensor builds at least every ORDERFLOW_DBT_HEARTBEAT_SECONDS (5 min) even when nothing
# landed (an incremental no-op), so an idle stream stays fresh and only a stalled build ages out.
ORDER_STATUS_FRESHNESS = FreshnessPolicy.time_window(
    fail_window=timedelta(minutes=30), warn_window=timedelta(minutes=10)
)
# How much of dbt's output a failed `run_dbt_build` quotes in its exception.
OUTPUT_TAIL_LINES = 60


def dbt_executable() -> str:
    """The dbt installed next to this Python (the venv's), else the first dbt on PATH."""
    beside_python = Path(sys.executable).parent / "dbt"
    if beside_python.exists():
        return str(beside_python)
    on_path = shutil.which("dbt")
    if on_path is None:
        raise RuntimeError(f"dbt is not installed: no {beside_python} and no dbt on PATH")
    return on_path


def _put_dbt_on_path() -> None:
    # DbtProject.prepare_if_dev() runs a DbtCliResource with the default executable "dbt", which it
    # looks up on PATH; `.venv/bin/dagster dev` without an activated venv would not find it.
    if shutil.which("dbt") is None:
        directory = str(Path(dbt_executable()).parent)
        os.environ["PATH"] = os.pathsep.join([directory, os.environ.get("PATH", "")])


def _manifest_is_stale(project: DbtProject) -> bool:
    """No manifest, or (in a source checkout) a project file edited after it was written."""
    if not project.manifest_path.exists():
        return True
    if repo_root() is None:  # an installed package: trust the manifest it ships
        return False
    written = project.manifest_path.stat().st_mtime
    sources = [project.project_dir / "dbt_project.yml", project.project_dir / "profiles.yml"]
    for directory in ("models", "macros", "seeds", "tests", "snapshots", "analyses"):
        sources += (project.project_dir / directory).rglob("*")
    return any(
        path.suffix in {".sql", ".yml", ".yaml", ".csv"} and path.stat().st_mtime > written
        for path in sources
    )


orderflow_dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
_put_dbt_on_path()
# Not `prepare_if_dev()`: under `dagster dev` it parses the project on every import, and every
# run worker inherits the flag that says so, which cost each landing run seconds of `dbt parse`.
# The manifest is parsed once, when missing or older than the project's files.
if _manifest_is_stale(orderflow_dbt_project):
    # Not prepared at build time (a fresh checkout, the tests) or edited since: parse now, a few
    # seconds, rather than fail to import or load outdated assets. Deployments ship the manifest
    # (see the module docstring).
    orderflow_dbt_project.preparer.prepare(orderflow_dbt_project)


class OrderflowDbtTranslator(DagsterDbtTranslator):
    """Asset keys, groups and upstream mapping for the orderflow dbt project.

    - Both dbt sources, raw.order_events and raw.ingest_ledger, map to the landing asset
      `raw_order_events`: one materialization of it writes the rows and their ledger entry in the
      same transaction, so they are one asset, not two (a separate `raw_ingest_ledger` key would be
      an asset nothing materializes).
    - Models and seeds are keyed by their bare name (`order_status`, `stg_order_events`,
      `customers`): stable whatever schema ORDERFLOW_ANALYTICS_SCHEMA selects.
    - Groups: staging models and the seeds -> "staging", marts -> "marts".
    """

    def __init__(self) -> None:
        super().__init__(
            settings=DagsterDbtTranslatorSettings(
                enable_asset_checks=True, enable_duplicate_source_asset_keys=True
            )
        )

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> AssetKey:
        resource_type = dbt_resource_props["resource_type"]
        if resource_type == "source" and dbt_resource_props["source_name"] == "raw":
            return RAW_ORDER_EVENTS_KEY
        if resource_type in ("model", "seed", "snapshot"):
            return AssetKey([dbt_resource_props["name"]])
        return super().get_asset_key(dbt_resource_props)

    def get_asset_spec(
        self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None
    ) -> AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        if spec.key == ORDER_STATUS_KEY:
            return spec.replace_attributes(freshness_policy=ORDER_STATUS_FRESHNESS)
        return spec

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        if dbt_resource_props["resource_type"] == "seed":
            return "staging"
        fqn = dbt_resource_props.get("fqn", [])
        if "staging" in fqn:
            return "staging"
        if "marts" in fqn:
            return "marts"
        return super().get_group_name(dbt_resource_props)


def dbt_env_from_dsn(dsn: str) -> dict[str, str]:
    """The variables dbt's profile reads, from a Postgres DSN.

    Accepts URIs (postgresql://user:pass@host:port/db?sslmode=require) and key=value strings;
    percent-escapes are decoded. A missing port means 5432, a missing dbname the user's name (as
    libpq does), a missing password the empty string (trust or .pgpass auth).
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg raises ProgrammingError for a malformed DSN
        raise ValueError(f"not a valid Postgres DSN: {exc}") from None
    user = params.get("user")
    if not user:
        raise ValueError("the Postgres DSN names no user")
    host = str(params.get("host") or "localhost")
    if "," in host:
        raise ValueError("multi-host Postgres DSNs are not supported by dbt-postgres")
    env = {
        "ORDERFLOW_PG_HOST": host,
        "ORDERFLOW_PG_PORT": str(params.get("port") or "5432"),
        "ORDERFLOW_PG_USER": str(user),
        "DBT_ENV_SECRET_ORDERFLOW_PG_PASSWORD": str(params.get("password") or ""),
        "ORDERFLOW_PG_DATABASE": str(params.get("dbname") or user),
    }
    if params.get("sslmode"):
        env["ORDERFLOW_PG_SSLMODE"] = str(params["sslmode"])
    return env


def dbt_session_env(environ: Mapping[str, str]) -> dict[str, str]:
    """PGOPTIONS for dbt's sessions: the incremental marts take the project's lock and then
    read what the previous build committed, which only READ COMMITTED shows them (under a
    REPEATABLE READ default the snapshot predates the lock's wait), and a build writes.
    dbt-postgres 1.11's profile has no field for session settings (it builds libpq's `options`
    only from `search_path`, which this project leaves unset), so they go through libpq's
    PGOPTIONS, after any the user set. Statement and lock timeouts stay the DBA's: one fails a
    build loudly, and the next build redoes it."""
    return {
        "PGOPTIONS": with_options(environ.get("PGOPTIONS"), libpq_options(TRANSACTION_DEFAULTS))
    }


def _dbt_env(dsn: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if dsn:
        env.update(dbt_env_from_dsn(dsn))
    env.update(dbt_session_env(env))
    env.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    env.setdefault("DBT_USE_COLORS", "false")
    return env


# dbt unit tests check the models' logic on fixed inputs, so their result cannot change between
# two pipeline runs of the same code: they run in CI (`run_dbt_build(..., unit_tests=True)`, see
# tests/test_dbt_models.py), not on every build of the pipeline (dbt's own advice).
PIPELINE_EXCLUDE = ["--exclude-resource-type", "unit_test"]


def build_args(
    *,
    full_refresh: bool = False,
    select: str | Sequence[str] | None = None,
    dbt_vars: Mapping[str, Any] | None = None,
    unit_tests: bool = False,
) -> list[str]:
    """The arguments after `dbt` for a `dbt build` of this project (without its unit tests unless
    `unit_tests`)."""
    args = ["build", "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR)]
    if not unit_tests:
        args += PIPELINE_EXCLUDE
    if full_refresh:
        args.append("--full-refresh")
    if select:
        args += ["--select", *([select] if isinstance(select, str) else select)]
    if dbt_vars:
        args += ["--vars", json.dumps(dict(dbt_vars))]
    return args


def run_dbt_build(
    dsn: str,
    *,
    full_refresh: bool = False,
    select: str | Sequence[str] | None = None,
    dbt_vars: Mapping[str, Any] | None = None,
    unit_tests: bool = False,
) -> None:
    """Run `dbt build` (seeds, models, data tests; unit tests too if `unit_tests`) against the
    database of `dsn`; raise on failure.

    Blocks until dbt exits. Other settings (ORDERFLOW_ANALYTICS_SCHEMA, ...) come from the
    environment. Artifacts and logs go to dbt_project/target/run_dbt_build, apart from the
    target/ Dagster loads its manifest from.
    """
    target = DBT_PROJECT_DIR / "target" / "run_dbt_build"
    env = _dbt_env(dsn) | {"DBT_TARGET_PATH": str(target), "DBT_LOG_PATH": str(target)}
    command = [
        dbt_executable(),
        *build_args(
            full_refresh=full_refresh, select=select, dbt_vars=dbt_vars, unit_tests=unit_tests
        ),
    ]
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with subprocess.Popen(
        command,
        cwd=DBT_PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        crash_armed = faults.armed("in_dbt")
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if crash_armed and past_halfway(line):
                crash_armed = False
                faults.crash_point("in_dbt", children=[proc.pid])
        returncode = proc.wait()
    if returncode != 0:
        output = "\n".join(tail)
        if marts_out_of_date(tail):
            raise MartsOutOfDateError(
                "the incremental marts were built by another version of the dbt project (their"
                " columns or types differ from the models'): rebuild them once with"
                " `orderflow catch-up --full-refresh`. dbt's output ends with:\n" + output
            )
        raise RuntimeError(
            f"dbt build failed (exit code {returncode}); the end of its output:\n" + output
        )


class MartsOutOfDateError(RuntimeError):
    """An incremental mart's table no longer matches its model (an upgrade changed a column or
    its type): only a full refresh can rebuild it; an incremental run never will."""


# what dbt prints when an incremental model's table and its SQL disagree on columns or types
_OUT_OF_SYNC = "schemas on this incremental model are out of sync"


def marts_out_of_date(lines: Iterable[str]) -> bool:
    return any(_OUT_OF_SYNC in line for line in lines)


# dbt's progress lines: "12:00:01  7 of 31 OK created sql incremental model analytics.order_events"
_PROGRESS = re.compile(r"\b(\d+) of (\d+) (?:OK|PASS|WARN)\b")


def past_halfway(line: str) -> bool:
    """Whether a line of dbt's output reports a node of the second half of the build done: where
    `in_dbt` fires, so the kill finds some models written and the rest unbuilt or mid-statement
    (dbt runs two threads)."""
    match = _PROGRESS.search(line)
    return match is not None and 2 * int(match.group(1)) >= int(match.group(2))


@dbt_assets(
    manifest=orderflow_dbt_project.manifest_path,
    dagster_dbt_translator=OrderflowDbtTranslator(),
    project=orderflow_dbt_project,
    name="orderflow_dbt",
    # one build at a time, however it was launched (orderflow_dagster/pools.py)
    pool=DBT_POOL,
)
def orderflow_dbt_models(context: AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
    """`dbt build` of the selected models, seeds and data tests, streamed as Dagster events."""
    dsn = os.environ.get(DSN_ENV_VAR)
    if dsn:
        # dagster-dbt passes this process's environment to dbt and also opens its own adapter
        # connection from the profile, so the profile's variables must be in os.environ.
        os.environ.update(dbt_env_from_dsn(dsn))
    # also read by this process's own dbt adapter and libpq sessions: the same pins as theirs
    os.environ.update(dbt_session_env(os.environ))
    invocation = dbt.cli(["build", *PIPELINE_EXCLUDE], context=context)
    events = dbt_build_events(invocation)
    expected = len(context.selected_output_names) + len(context.selected_asset_check_keys)
    yield from crash_halfway(events, expected, invocation.process.pid)


def crash_halfway(events: Iterable[Any], expected: int, dbt_pid: int) -> Iterator[Any]:
    """The asset's events, passed through; with `in_dbt` armed, dbt and then this process are
    SIGKILLed once half of the `expected` results have been reported (as `run_dbt_build` does)."""
    if not faults.armed("in_dbt"):
        yield from events
        return
    for done, event in enumerate(events, start=1):
        yield event
        if 2 * done >= expected:
            faults.crash_point("in_dbt", children=[dbt_pid])


class OrderflowDbtCliResource(DbtCliResource):
    """dagster-dbt's resource, without the `dbt --version` subprocess it starts in every run to
    learn the version (about 2 s of a dbt import): when the executable is the dbt installed beside
    this Python, the version is that of the dbt-core package this process sees."""

    @cached_property
    def _cli_version(self) -> version.Version:
        if Path(self.dbt_executable).parent == Path(sys.executable).parent:
            return version.parse(importlib.metadata.version("dbt-core"))
        return super()._cli_version


def dbt_resource() -> DbtCliResource:
    """The `dbt` resource `orderflow_dbt_models` needs."""
    return OrderflowDbtCliResource(
        project_dir=orderflow_dbt_project, dbt_executable=dbt_executable()
    )
