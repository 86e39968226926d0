"""The whole path, producer to order_status: real Kafka, real Postgres, real dbt.

The produced stream carries duplicates of the same event_id on different Kafka partitions,
out-of-order lifecycles, v1 and v2 OrderCreated payloads and poison messages. After catch-up,
analytics.order_status must equal an oracle computed in Python from the produced events, row for
row, in several incremental rounds and after a full refresh.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import psycopg
import pytest
from oracle import expected_order_status, landed, read_customers_csv
from psycopg.rows import dict_row

from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.transform.dbt import DBT_PROJECT_DIR, run_dbt_build
from tests.support import invariants, mart_duplicates, produce
from tests.test_catch_up import cli
from tests.test_landing import connections

CUSTOMERS = read_customers_csv(DBT_PROJECT_DIR / "seeds" / "customers.csv")
BIN = Path(sys.executable).parent
DEFINITIONS = "orderflow_dagster.definitions"


@pytest.fixture
def env(cli_env, topic, monkeypatch):
    schema = "analytics"
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", schema)
    return cli_env(
        group=f"e2e-{topic}", max_events_per_batch=1000, ORDERFLOW_ANALYTICS_SCHEMA=schema
    )


def mixed_stream(orders: int, seed: int) -> list:
    """Duplicates across partitions, out-of-order lifecycles, poison, v1 and v2 payloads."""
    return list(
        generate(
            orders,
            seed=seed,
            cross_partition_duplicate_share=1.0,
            duplicate_rate=0.1,
            out_of_order_rate=0.3,
            poison_rate=0.03,
            v2_share=0.5,
        )
    )


def oracle_rows(outgoing) -> list[dict]:
    # Copies of an event_id are byte-identical here, so which copy wins does not change
    # order_status; the landing order given to the oracle is just the emission order.
    counter = itertools.count()
    records = [
        landed(
            o.event,
            topic="t",
            kafka_partition=0,
            kafka_offset=next(counter),
            landed_at=0,
            trace_id=o.event.get("trace_id"),
        )
        for o in outgoing
        if o.event is not None
    ]
    return expected_order_status(records, CUSTOMERS)


def actual_rows(dsn: str) -> list[dict]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute("select * from analytics.order_status order by order_id").fetchall()
    for row in rows:
        row.pop("updated_at")
        row["last_event_id"] = str(row["last_event_id"])
    return rows


def record_trial(env, fault_report, produced: int, recovery_s: float):
    with connections(
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
        env["ORDERFLOW_POSTGRES_DSN"],
        env["ORDERFLOW_CONSUMER_GROUP"],
    ) as (conn, consumer):
        inv = invariants(conn, consumer, env["ORDERFLOW_TOPIC"], produced)
        duplicates = mart_duplicates(conn)
    fault_report.record_invariants(
        "9. same event_ids at new offsets", inv, recovery_s=recovery_s, mart_duplicates=duplicates
    )
    return inv, duplicates


@pytest.mark.faults
def test_order_status_equals_the_oracle_across_incremental_rounds_and_a_full_refresh(
    env, fault_report
):
    everything = []
    # rounds use different seeds (new orders) and the same seed again (a full upstream replay:
    # the same event_ids at new offsets)
    rounds = ((11, 300), (12, 200), (11, 300))
    for i, (seed, orders) in enumerate(rounds):
        outgoing = mixed_stream(orders, seed)
        produce(env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_TOPIC"], outgoing)
        everything += outgoing
        replay = time.monotonic()
        done = cli("catch-up", env=env)
        if i == len(rounds) - 1:
            # the replay round is the fault: its catch-up is the recovery
            inv, duplicates = record_trial(
                env, fault_report, len(everything), time.monotonic() - replay
            )
            inv.assert_exactly_once()
            assert duplicates == 0
        assert "lag:          0" in done.stdout and "dbt models:   built" in done.stdout
        expected = oracle_rows(everything)
        actual = actual_rows(env["ORDERFLOW_POSTGRES_DSN"])
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert a == e, {
                k: (a.get(k), e.get(k)) for k in set(a) | set(e) if a.get(k) != e.get(k)
            }

    kinds = {o.kind for o in everything}
    assert {"event", "duplicate", "poison"} <= kinds
    assert any(
        o.event and o.event["schema_version"] == 1 and o.event["event_type"] == "OrderCreated"
        for o in everything
    )
    incremental = actual_rows(env["ORDERFLOW_POSTGRES_DSN"])
    run_dbt_build(env["ORDERFLOW_POSTGRES_DSN"], full_refresh=True)
    assert actual_rows(env["ORDERFLOW_POSTGRES_DSN"]) == incremental
    # poison never reaches the marts
    with psycopg.connect(env["ORDERFLOW_POSTGRES_DSN"]) as conn:
        dead, leaked = conn.execute(
            "select (select count(*) from raw.dead_letters),"
            " (select count(*) from analytics.order_events e join raw.dead_letters d"
            "  on d.kafka_partition = e.kafka_partition and d.kafka_offset = e.kafka_offset)"
        ).fetchone()
    assert dead > 0 and leaked == 0


def dbt_builds_of(dbname: str) -> list[psutil.Process]:
    """Live `dbt build` processes of this project working on database `dbname`."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "build" not in cmdline or str(DBT_PROJECT_DIR) not in cmdline:
            continue
        with suppress(psutil.Error):
            if (
                proc.info["status"] != psutil.STATUS_ZOMBIE
                and proc.environ().get("ORDERFLOW_PG_DATABASE") == dbname
            ):
                out.append(proc)
    return out


def kill_dbt_halfway(path: str, env: dict) -> None:
    """Run the dbt build with `in_dbt` armed, through `orderflow catch-up` (run_dbt_build) or
    through Dagster's dbt asset (dagster-dbt, the job the sensor launches)."""
    crashing = {**env, "ORDERFLOW_CRASH_AT": "in_dbt"}
    if path == "catch-up":
        killed = cli("catch-up", env=crashing, check=False)
        # -9: only the in_dbt point was armed, and it fires while dbt's output is being read
        assert killed.returncode == -9, killed.stdout + killed.stderr
        return
    cli("catch-up", "--no-dbt", env=env)
    killed = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-j", "orderflow_dbt_job", "-m", DEFINITIONS],
        env=crashing,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = killed.stdout + killed.stderr
    # the run executes in process, so its process killed itself (and dbt) after some of the
    # build's results were reported
    assert killed.returncode == -9, output[-3000:]
    assert "ASSET_MATERIALIZATION" in output, output[-3000:]


@pytest.mark.faults
@pytest.mark.parametrize("path", ["catch-up", "dagster-asset"])
def test_dbt_killed_halfway_through_a_build_leaves_the_marts_equal_to_the_oracle_after_a_rerun(
    env, fault_report, path
):
    bootstrap, dsn, topic = (
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
        env["ORDERFLOW_POSTGRES_DSN"],
        env["ORDERFLOW_TOPIC"],
    )
    first = mixed_stream(200, seed=21)
    produce(bootstrap, topic, first)
    cli("catch-up", env=env)  # the marts exist: the killed build is an incremental one
    # new orders, and the first stream again at new offsets (the same event_ids)
    second = mixed_stream(150, seed=22) + first
    produce(bootstrap, topic, second)
    kill_dbt_halfway(path, env)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    _, orphans = psutil.wait_procs(dbt_builds_of(dbname), timeout=10)

    recovery = time.monotonic()
    cli("catch-up", env=env)
    everything = first + second
    expected = oracle_rows(everything)
    actual = actual_rows(dsn)
    with connections(bootstrap, dsn, env["ORDERFLOW_CONSUMER_GROUP"]) as (conn, consumer):
        inv = invariants(conn, consumer, topic, len(everything))
        duplicates = mart_duplicates(conn)
    fault_report.record_invariants(
        f"1. SIGKILL at in_dbt ({path})",
        inv,
        recovery_s=time.monotonic() - recovery,
        mart_duplicates=duplicates,
    )
    assert not orphans, "dbt outlived the process that ran it"
    inv.assert_exactly_once()
    assert duplicates == 0
    assert actual == expected
