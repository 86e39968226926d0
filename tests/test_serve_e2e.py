"""`orderflow serve` end to end: the real code server, daemon and webserver on Dagster storage in
Postgres, landing a stream, stopping on a signal with nothing left behind, and surviving its
daemon and code server killed mid-burst. Slow: CI runs them, `make test-fast` skips them."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import make_url

from orderflow_dagster import pools
from orderflow_dagster.land import kafka_source
from orderflow_dagster.serve import serve
from orderflow_dagster.stack._proc import port_open
from tests.dagster_processes import (
    ManagedProcess,
    clean_environ,
    free_port,
    orderflow_env,
    orderflow_serve,
    running,
    serve_tree,
    wait_for_http,
    wait_until,
)
from tests.support import produce_orders, scratch_database
from tests.test_dagster_e2e import PARTITION_TAG, ledger, run_summary, wait_for_daemon_to_land

REPO = Path(__file__).resolve().parents[1]
# ~560 messages, ~140 per Kafka partition: one range on each of the 4 partitions
ORDERS = 150
MAX_EVENTS_PER_BATCH = 250
# generous: each run is a fresh process, slow to start on a busy 2-core machine, and with a
# landing pool of one the ranges land one after the other
LAND_TIMEOUT_S = 900
START_TIMEOUT_S = 300
# what `orderflow serve` is given to stop everything after a signal: its own grace period
# (serve.STOP_GRACE_SECONDS) and the SIGKILLs after it, with room for a busy machine. Without the
# signal handling, the processes would run on indefinitely.
STOP_BOUND_S = serve.STOP_GRACE_SECONDS + 40


@dataclass(frozen=True)
class DagsterStorage:
    """A scratch database for Dagster's storage: its URL for serve, its DSN for the test."""

    url: str
    dsn: str


@pytest.fixture
def dagster_storage(stack_dsn: str) -> Iterator[DagsterStorage]:
    with scratch_database(stack_dsn) as dsn:
        url = serve.dagster_storage_url(stack_dsn, conninfo_to_dict(dsn)["dbname"])
        yield DagsterStorage(url=url, dsn=dsn)


@pytest.fixture
def serve_env(kafka_bootstrap, postgres_dsn, topic, tmp_path, dagster_storage, monkeypatch):
    """A factory of the environment of `orderflow serve` for this test's topic and databases; the
    test process gets the storage URL too, to open the same instance."""
    monkeypatch.setenv(serve.STORAGE_URL_ENV, dagster_storage.url)

    def make(**extra: str) -> dict[str, str]:
        return orderflow_env(
            dagster_home=tmp_path / "dagster_home",
            bootstrap_servers=kafka_bootstrap,
            dsn=postgres_dsn,
            topic=topic,
            consumer_group=f"orderflow-serve-{uuid.uuid4().hex[:8]}",
            extra={serve.STORAGE_URL_ENV: dagster_storage.url, **extra},
        )

    return make


@dataclass(frozen=True)
class Watched:
    """What the test watches the pipeline through while serve lands a stream."""

    conn: psycopg.Connection
    consumer: object
    instance: DagsterInstance
    outgoing: list


def open_instance(env: dict[str, str]) -> DagsterInstance:
    """The instance serve prepared (its dagster.yaml, on the Postgres storage)."""
    return DagsterInstance.from_config(env["DAGSTER_HOME"])


def wait_for_ui(proc: ManagedProcess, port: int) -> None:
    body = wait_for_http(f"http://127.0.0.1:{port}/server_info", proc, timeout_s=START_TIMEOUT_S)
    assert "dagster_webserver_version" in body


def landing_run_records(instance: DagsterInstance):
    return [r for r in instance.get_run_records() if PARTITION_TAG in r.dagster_run.tags]


def finished(records) -> bool:
    return bool(records) and all(r.dagster_run.is_finished for r in records)


def stop_with(proc: ManagedProcess, port: int, send) -> None:
    """Signal serve the way `send` does, then check that serve exits 0 and that every process
    of its tree, and the UI's port, are gone within STOP_BOUND_S."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.track_descendants()
    send()
    code = proc.popen.wait(timeout=STOP_BOUND_S)
    _, alive = psutil.wait_procs(tree, timeout=5)
    survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in alive if p.is_running()]
    assert survivors == [], survivors
    assert code == 0, proc.tail()
    assert not port_open(port)


def test_without_a_storage_url_serve_keeps_dagster_in_the_dagster_database_of_the_server(
    kafka_bootstrap, postgres_dsn, tmp_path
):
    env = {
        "ORDERFLOW_HOME": str(tmp_path),
        "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "ORDERFLOW_POSTGRES_DSN": postgres_dsn,
        "PATH": os.environ["PATH"],
    }
    instance = serve.prepare_instance(env)
    assert instance.home == (tmp_path / "dagster").resolve()
    assert instance.env["DAGSTER_HOME"] == str(instance.home)
    url = make_url(instance.env[serve.STORAGE_URL_ENV])
    server = conninfo_to_dict(postgres_dsn)
    assert url.drivername == "postgresql+psycopg2"
    assert (url.host, str(url.port), url.database) == (server["host"], server["port"], "dagster")
    # Dagster's tables are there, and the pools' limits in them
    with psycopg.connect(make_conninfo(postgres_dsn, dbname="dagster")) as conn:
        assert conn.execute("select to_regclass('runs')").fetchone()[0] == "runs"
        limits = dict(conn.execute('select concurrency_key, "limit" from concurrency_limits'))
    assert limits == {pools.DBT_POOL: 1, pools.LANDING_POOL: pools.DEFAULT_LANDING_LIMIT}
    # the managed home's dagster.yaml is the shipped one, refreshed at every start
    (instance.home / "dagster.yaml").write_text("stale: true\n")
    serve.prepare_instance(env)
    shipped = (REPO / "deploy" / "dagster.yaml").read_text()
    assert (instance.home / "dagster.yaml").read_text().endswith(shipped)


def test_a_missing_dagster_database_is_created_on_the_pipelines_server(stack_dsn):
    name = f"test_dagster_{uuid.uuid4().hex[:10]}"
    serve.ensure_database(stack_dsn, name)
    try:
        serve.ensure_database(stack_dsn, name)  # and found the second time
        with psycopg.connect(make_conninfo(stack_dsn, dbname=name)) as conn:
            assert conn.execute("select current_database()").fetchone()[0] == name
    finally:
        with psycopg.connect(stack_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database {}").format(sql.Identifier(name)))


@pytest.mark.slow
def test_orderflow_serve_lands_a_stream_on_postgres_storage_one_landing_run_at_a_time(
    kafka_bootstrap, topic, tmp_path, serve_env, postgres_dsn, dagster_storage
):
    outgoing = produce_orders(kafka_bootstrap, topic, ORDERS, duplicate_rate=0.1, poison_rate=0.05)
    env = serve_env(
        ORDERFLOW_MAX_EVENTS_PER_BATCH=str(MAX_EVENTS_PER_BATCH),
        **{pools.LANDING_LIMIT_ENV: "1"},
    )
    port = free_port()
    with (
        orderflow_serve(env, tmp_path / "logs", port) as proc,
        psycopg.connect(postgres_dsn, autocommit=True) as conn,
        psycopg.connect(dagster_storage.dsn, autocommit=True) as dagster_db,
    ):
        wait_for_ui(proc, port)
        consumer = kafka_source.open_consumer(kafka_bootstrap, env["ORDERFLOW_CONSUMER_GROUP"])
        instance = open_instance(env)
        try:
            watched = Watched(conn, consumer, instance, outgoing)
            inv = wait_for_daemon_to_land(watched, topic, proc, "serve", LAND_TIMEOUT_S)
            inv.assert_exactly_once()
            records = wait_until(
                lambda: (rs := landing_run_records(instance)) and finished(rs) and rs,
                timeout_s=120,
                what="every landing run to finish",
                watch=[proc],
                describe=lambda: run_summary(instance),
            )
            # the landings asked for a dbt build: the sensor requested it, the dbt pool let it run
            wait_until(
                lambda: any(
                    r.job_name == "orderflow_dbt_job" and r.status == DagsterRunStatus.SUCCESS
                    for r in instance.get_runs()
                ),
                timeout_s=LAND_TIMEOUT_S,
                interval_s=2.0,
                what="a successful dbt build",
                watch=[proc],
                describe=lambda: run_summary(instance),
            )
            limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
        finally:
            instance.dispose()
            consumer.close()
        stored = dict(dagster_db.execute("select run_id, status from runs").fetchall())
        keys = [key for key, *_ in ledger(conn, topic)]

    assert len(keys) >= 4 and len(set(keys)) == len(keys)
    assert sorted(r.dagster_run.tags[PARTITION_TAG] for r in records) == sorted(keys)
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records)
    # the runs are in Dagster's tables of the storage database
    assert {r.dagster_run.run_id: "SUCCESS" for r in records}.items() <= stored.items()
    assert limits == {pools.DBT_POOL: 1, pools.LANDING_POOL: 1}
    # a pool of one: each landing run started after the previous one ended
    spans = sorted((r.start_time, r.end_time) for r in records)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    shipped = (REPO / "deploy" / "dagster.yaml").read_text()
    assert (Path(env["DAGSTER_HOME"]) / "dagster.yaml").read_text().endswith(shipped)


@pytest.mark.slow
def test_sigterm_stops_serve_and_every_process_it_started_run_workers_included(
    kafka_bootstrap, topic, tmp_path, serve_env
):
    produce_orders(kafka_bootstrap, topic, ORDERS, duplicate_rate=0.1, poison_rate=0.05)
    env = serve_env(ORDERFLOW_MAX_EVENTS_PER_BATCH="100")
    port = free_port()
    with orderflow_serve(env, tmp_path / "logs", port) as proc:
        wait_for_ui(proc, port)
        # signalled while runs are in flight, so run workers have to be stopped too
        tree = wait_until(
            lambda: (t := serve_tree(proc)) and all(t.values()) and t,
            timeout_s=LAND_TIMEOUT_S,
            interval_s=0.5,
            what="a run worker beside the code server, the daemon and the webserver",
            watch=[proc],
        )
        assert len(tree["daemon"]) == len(tree["webserver"]) == len(tree["code server"]) == 1
        stop_with(proc, port, lambda: os.kill(proc.pid, signal.SIGTERM))


@pytest.mark.slow
def test_ctrl_c_on_the_demo_stops_every_dagster_process(stack, topic, tmp_path, dagster_storage):
    from tests.conftest import TEST_HOME

    kafka_port = int(stack.bootstrap_servers.rsplit(":", 1)[1])
    postgres_port = int(conninfo_to_dict(stack.dsn)["port"])
    port = free_port()
    env = clean_environ()
    # the test stack, found running, instead of the demo's own; a scratch database for Dagster
    env.update(
        {
            "ORDERFLOW_HOME": str(TEST_HOME),
            "ORDERFLOW_KAFKA_PORT": str(kafka_port),
            "ORDERFLOW_POSTGRES_PORT": str(postgres_port),
            "ORDERFLOW_KAFKA_LIBS": str(REPO / ".orderflow" / "kafka" / "libs"),
            "ORDERFLOW_TOPIC": topic,
            "ORDERFLOW_CONSUMER_GROUP": f"orderflow-demo-{uuid.uuid4().hex[:8]}",
            "ORDERFLOW_DEMO_ORDERS": "40",
            "ORDERFLOW_UI_PORT": str(port),
            "DAGSTER_HOME": str(tmp_path / "dagster_home"),
            serve.STORAGE_URL_ENV: dagster_storage.url,
            "PYTHONUNBUFFERED": "1",
        }
    )
    argv = [sys.executable, "-m", "orderflow_dagster.demo"]
    with running("demo", argv, env=env, log_dir=tmp_path / "logs") as proc:
        wait_for_ui(proc, port)
        wait_until(
            lambda: (t := serve_tree(proc)) and t["daemon"] and t["code server"],
            timeout_s=60,
            what="the daemon and the code server",
            watch=[proc],
        )
        # a terminal's Ctrl-C: SIGINT to the foreground process group, which the Dagster
        # processes have left
        stop_with(proc, port, lambda: os.killpg(proc.pid, signal.SIGINT))


@pytest.mark.slow
@pytest.mark.faults
def test_the_daemon_and_the_code_server_killed_mid_burst_lose_and_duplicate_nothing(
    kafka_bootstrap, topic, tmp_path, serve_env, postgres_dsn, fault_report
):
    # no duplicates and no poison: every record carries an event_id of its own
    outgoing = produce_orders(kafka_bootstrap, topic, 250, duplicate_rate=0.0, poison_rate=0.0)
    env = serve_env(
        ORDERFLOW_MAX_EVENTS_PER_BATCH="120",
        ORDERFLOW_MAX_INFLIGHT="2",
        ORDERFLOW_RETRY_GRACE_SECONDS="20",
    )
    port = free_port()
    with (
        orderflow_serve(env, tmp_path / "logs", port) as proc,
        psycopg.connect(postgres_dsn, autocommit=True) as conn,
    ):
        wait_for_ui(proc, port)
        consumer = kafka_source.open_consumer(kafka_bootstrap, env["ORDERFLOW_CONSUMER_GROUP"])
        instance = open_instance(env)
        try:

            def landed_ranges() -> int:
                if conn.execute("select to_regclass('raw.ingest_ledger')").fetchone()[0] is None:
                    return 0
                return conn.execute(
                    "select count(*) from raw.ingest_ledger where topic = %s", (topic,)
                ).fetchone()[0]

            # mid-burst: ranges landed, more to come, a run worker running
            tree = wait_until(
                lambda: landed_ranges() >= 1 and (t := serve_tree(proc))["run worker"] and t,
                timeout_s=LAND_TIMEOUT_S,
                interval_s=0.5,
                what="a first landed range and a run in flight",
                watch=[proc],
            )
            (daemon,) = tree["daemon"]
            (code_server,) = tree["code server"]
            proc.track_descendants()
            # SIGKILL these two alone: the runs they started live on as orphans
            daemon.kill()
            code_server.kill()
            recovery = time.monotonic()
            wait_until(
                lambda: (
                    (t := serve_tree(proc))["daemon"]
                    and t["code server"]
                    and t["daemon"][0].pid != daemon.pid
                    and t["code server"][0].pid != code_server.pid
                ),
                timeout_s=START_TIMEOUT_S,
                what="serve to start the daemon and the code server again",
                watch=[proc],
            )
            watched = Watched(conn, consumer, instance, outgoing)
            inv = wait_for_daemon_to_land(
                watched, topic, proc, "the restarted processes", LAND_TIMEOUT_S
            )
            recovery_s = time.monotonic() - recovery
        finally:
            instance.dispose()
            consumer.close()
        landed = Counter(
            event_id
            for (event_id,) in conn.execute(
                "select event_id::text from raw.order_events where topic = %s", (topic,)
            )
        )
        keys = [key for key, *_ in ledger(conn, topic)]
    fault_report.record_invariants(
        "17. daemon and code server SIGKILLed mid-burst under serve", inv, recovery_s=recovery_s
    )
    inv.assert_exactly_once()
    assert landed == Counter(o.event["event_id"] for o in outgoing)
    assert set(landed.values()) == {1}
    assert len(keys) == len(set(keys))  # every range landed once
