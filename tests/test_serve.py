"""The production-shaped instance without processes: the shipped dagster.yaml as Dagster reads it,
the storage URL `orderflow serve` derives, the pools the assets name, and the CLI's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.instance.config import (
    ConcurrencyConfig,
    PoolGranularity,
    dagster_instance_config,
    get_default_tick_retention_settings,
    get_tick_retention_settings,
)
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
from dagster._core.scheduler.instigation import TickStatus
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import make_conninfo
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.engine import make_url

from orderflow_dagster import pools
from orderflow_dagster.serve import serve

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def shipped_config() -> dict:
    """deploy/dagster.yaml validated and defaulted by Dagster's own instance-config schema."""
    config, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    return config


def test_the_instance_serve_copies_ships_in_the_package_and_is_the_documented_one():
    package = Path(serve.__file__).resolve().parent
    assert serve.DEPLOY_CONFIG.resolve().parent == package
    assert (DEPLOY / "dagster.yaml").resolve() == serve.DEPLOY_CONFIG.resolve()


def test_the_shipped_instance_keeps_its_storage_in_postgres_from_the_environment(shipped_config):
    assert shipped_config["storage"] == {
        "postgres": {"postgres_url": {"env": serve.STORAGE_URL_ENV}}
    }


def test_the_shipped_instance_queues_runs_behind_run_level_pools_and_no_tag_limit(
    shipped_config,
):
    coordinator = shipped_config["run_coordinator"]
    assert coordinator["class"] == QueuedRunCoordinator.__name__
    assert "tag_concurrency_limits" not in coordinator["config"]
    assert coordinator["config"]["dequeue_interval_seconds"] == 1
    queue = QueuedRunCoordinator(**coordinator["config"]).get_run_queue_config()
    concurrency = ConcurrencyConfig.from_concurrency_settings(shipped_config["concurrency"], queue)
    # a queued run waits for a slot of each pool it needs, one per run in progress
    assert concurrency.pool_config.pool_granularity == PoolGranularity.RUN
    assert concurrency.pool_config.default_pool_limit == 1
    assert concurrency.run_queue_config.max_concurrent_runs == 3
    assert not concurrency.run_queue_config.tag_concurrency_limits
    assert concurrency.run_queue_config.should_block_op_concurrency_limited_runs


def test_the_shipped_instance_retries_runs_and_monitors_them(shipped_config):
    assert shipped_config["run_retries"]["enabled"] is True
    assert shipped_config["run_retries"]["max_retries"] >= 1
    monitoring = shipped_config["run_monitoring"]
    assert monitoring["enabled"] is True
    assert monitoring["start_timeout_seconds"] > 0 and monitoring["max_runtime_seconds"] > 0


@pytest.mark.parametrize("instigator", [InstigatorType.SENSOR, InstigatorType.SCHEDULE])
def test_skipped_ticks_are_purged_after_a_day_and_failures_kept_a_week(shipped_config, instigator):
    section = {InstigatorType.SENSOR: "sensor", InstigatorType.SCHEDULE: "schedule"}[instigator]
    retention = get_tick_retention_settings(
        shipped_config["retention"][section], get_default_tick_retention_settings(instigator)
    )
    assert retention[TickStatus.SKIPPED] == 1
    assert retention[TickStatus.FAILURE] == 7
    # every status is purged at some point (-1 would keep it forever)
    assert all(days > 0 for days in retention.values())


def test_sensors_are_evaluated_in_threads(shipped_config):
    assert shipped_config["sensors"]["use_threads"] is True
    assert shipped_config["sensors"]["num_workers"] >= 2


def test_the_helm_values_configure_the_same_instance():
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"] == {"granularity": "run", "defaultLimit": 1}
    daemon = values["dagsterDaemon"]
    queue = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert "tagConcurrencyLimits" not in queue and "maxConcurrentRuns" not in queue
    assert daemon["runRetries"]["enabled"] and daemon["runMonitoring"]["enabled"]
    assert values["retention"]["sensor"]["purgeAfterDays"]["skipped"] == 1
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "orderflow_dagster.definitions"]
    # secrets come from Kubernetes Secrets, never from the values
    assert "secret" not in yaml.safe_dump(deployment.get("env", [])).lower()


def test_the_landing_and_the_dbt_build_each_name_their_pool():
    from orderflow_dagster.defs.assets import raw_order_events
    from orderflow_dagster.transform.dbt import orderflow_dbt_models

    assert raw_order_events.op.pool == pools.LANDING_POOL
    assert orderflow_dbt_models.op.pool == pools.DBT_POOL


def test_dbt_gets_one_slot_and_landing_the_configured_number():
    assert pools.pool_limits({}) == {"dbt": 1, "landing": pools.DEFAULT_LANDING_LIMIT}
    assert pools.pool_limits({pools.LANDING_LIMIT_ENV: "5"}) == {"dbt": 1, "landing": 5}
    with pytest.raises(ValueError, match=pools.LANDING_LIMIT_ENV):
        pools.pool_limits({pools.LANDING_LIMIT_ENV: "0"})


# libpq accepts any character in a password or user name but NUL
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1)
HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.from_regex(r"/[a-z]{1,8}(/[a-z]{1,8}){0,2}", fullmatch=True),  # a unix socket directory
)


@given(
    user=TEXT,
    password=st.one_of(st.none(), TEXT),
    host=HOSTS,
    port=st.integers(1, 65535),
    dbname=TEXT,
    sslmode=st.one_of(st.none(), st.sampled_from(["disable", "require", "verify-full"])),
    as_url=st.booleans(),
)
def test_the_derived_storage_url_reaches_the_same_server_as_the_dsn_with_the_dagster_database(
    user, password, host, port, dbname, sslmode, as_url
):
    params = {"user": user, "password": password, "host": host, "port": port, "dbname": dbname}
    params = {k: v for k, v in {**params, "sslmode": sslmode}.items() if v is not None}
    dsn = make_conninfo("", **params)
    if as_url:
        from urllib.parse import quote

        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        netloc = f"{auth}@{quote(host, safe='')}:{port}"
        dsn = f"postgresql://{netloc}/{quote(dbname, safe='')}" + (
            f"?sslmode={sslmode}" if sslmode else ""
        )
    url = serve.dagster_storage_url(dsn, "dagster")
    assert url.startswith("postgresql+psycopg2://")
    # what psycopg2 is handed: the DSN's server, user, password and options, the other database
    _, connect = PGDialect_psycopg2().create_connect_args(make_url(url))
    expected = {**params, "dbname": "dagster"}
    assert {k: str(v) for k, v in connect.items()} == {k: str(v) for k, v in expected.items()}


def test_a_multi_host_dsn_needs_an_explicit_storage_url():
    with pytest.raises(ValueError, match=serve.STORAGE_URL_ENV):
        serve.dagster_storage_url("host=a,b port=5432,5433 user=u dbname=d")


@pytest.mark.parametrize(
    ("given_url", "expected"),
    [
        ("postgresql://u:p@h:5/db", "postgresql+psycopg2://u:p@h:5/db"),
        ("postgres://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("postgresql+pg8000://u:p@h/db", "postgresql+pg8000://u:p@h/db"),
    ],
)
def test_a_storage_url_without_a_driver_gets_psycopg2(given_url, expected):
    assert serve.psycopg2_url(given_url) == expected


def test_serve_refuses_to_start_without_the_pipeline_services(tmp_path):
    env = {"ORDERFLOW_HOME": str(tmp_path)}
    with pytest.raises(RuntimeError, match="ORDERFLOW_POSTGRES_DSN"):
        serve.prepare_instance(env)
    assert not (tmp_path / "dagster").exists()
