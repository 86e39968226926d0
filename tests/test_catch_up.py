"""`orderflow produce` + `orderflow catch-up` through the real console script."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from orderflow_dagster.land import kafka_source
from orderflow_dagster.serve.catch_up import EXIT_MARTS_OUT_OF_DATE
from tests.support import invariants
from tests.test_landing import connections

BIN = Path(sys.executable).parent


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "orderflow"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"orderflow {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def env(cli_env, topic):
    return cli_env(group=f"catch-up-{topic}", max_events_per_batch=400)


def test_catch_up_lands_a_produced_stream_until_the_lag_is_zero(env, topic):
    produced = cli("produce", "--orders", "500", "--poison-rate", "0.02", "--quiet", env=env)
    messages = int(produced.stdout.split("messages=")[1].split()[0])
    done = cli("catch-up", "--no-dbt", env=env)
    assert "lag:          0" in done.stdout
    with connections(
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
        env["ORDERFLOW_POSTGRES_DSN"],
        env["ORDERFLOW_CONSUMER_GROUP"],
    ) as (conn, consumer):
        inv = invariants(conn, consumer, topic, messages)
        inv.assert_exactly_once()
        assert inv.dead_letters > 0


@pytest.mark.faults
def test_catch_up_killed_midway_finishes_on_the_next_run_without_duplicates(
    env, topic, fault_report
):
    produced = cli("produce", "--orders", "800", "--quiet", env=env)
    messages = int(produced.stdout.split("messages=")[1].split()[0])
    env_small = {**env, "ORDERFLOW_MAX_EVENTS_PER_BATCH": "150"}
    proc = subprocess.Popen(
        [str(BIN / "orderflow"), "catch-up", "--no-dbt"],
        env=env_small,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # kill it once it has landed something but not everything
    with connections(
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
        env["ORDERFLOW_POSTGRES_DSN"],
        env["ORDERFLOW_CONSUMER_GROUP"],
    ) as (conn, consumer):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                landed = conn.execute("select count(*) from raw.ingest_ledger").fetchone()[0]
            except Exception:  # the schema may not exist yet
                landed = 0
            if landed >= 3:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        partial = conn.execute("select count(*) from raw.ingest_ledger").fetchone()[0]
        assert partial >= 3
        rerun = time.monotonic()
        cli("catch-up", "--no-dbt", env=env_small)
        inv = invariants(conn, consumer, topic, messages)
        fault_report.record_invariants(
            "2. catch-up SIGKILLed once midway", inv, recovery_s=time.monotonic() - rerun
        )
        inv.assert_exactly_once()


def test_verify_passes_after_catch_up_and_fails_when_kafka_is_ahead_of_the_ledger(env, topic):
    cli("produce", "--orders", "100", "--quiet", env=env)
    cli("catch-up", "--no-dbt", env=env)
    ok = cli("verify", env=env)
    assert "FAIL" not in ok.stdout and "lag   0" in ok.stdout
    assert "ok    one audit row per record" in ok.stdout
    assert "ok    one landed copy per event_id" in ok.stdout
    with connections(
        env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"],
        env["ORDERFLOW_POSTGRES_DSN"],
        env["ORDERFLOW_CONSUMER_GROUP"],
    ) as (conn, consumer):
        end = conn.execute(
            "select max(end_offset) from raw.ingest_ledger where kafka_partition = 0"
        ).fetchone()[0]
        kafka_source.commit(consumer, topic, {0: end + 5})  # an operator's mistake
        # and two copies of an event written by hand (a botched fix, say), one of them
        # audited as a second `landed`, the other not audited at all
        for shift in (1_000_000, 2_000_000):
            conn.execute(
                "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
                " aggregate_id, event_type, schema_version, event_ts_ms, payload, run_id)"
                " select topic, kafka_partition, kafka_offset + %s, event_id, aggregate_id,"
                " event_type, schema_version, event_ts_ms, payload, 'by-hand'"
                " from raw.order_events where topic = %s order by kafka_offset limit 1",
                (shift, topic),
            )
        conn.execute(
            "insert into audit.ingest_log (topic, kafka_partition, kafka_offset, event_id,"
            " outcome, run_id, partition_key) select topic, kafka_partition, kafka_offset,"
            " event_id, 'landed', run_id, 'by-hand' from raw.order_events"
            " where topic = %s and run_id = 'by-hand' order by kafka_offset limit 1",
            (topic,),
        )
    bad = cli("verify", env=env, check=False)
    assert bad.returncode == 1
    assert "FAIL  Kafka never ahead of Postgres" in bad.stdout
    assert "FAIL  one audit row per record" in bad.stdout
    assert "FAIL  one landed copy per event_id" in bad.stdout


def test_verify_reports_gaps_and_overlaps_in_the_ledger():
    from orderflow_dagster.serve.verify import ledger_gaps

    assert ledger_gaps({0: [(0, 10), (10, 20)], 1: [(5, 9)]}) == {}
    assert ledger_gaps({0: [(0, 10), (12, 20), (15, 30)]}) == {
        0: ["gap [10, 12)", "overlap [15, 20)"]
    }


def test_marts_built_by_another_version_fail_clearly_and_a_full_refresh_rebuilds_them(env):
    cli("produce", "--orders", "60", "--quiet", env=env)
    cli("catch-up", env=env)
    dsn = env["ORDERFLOW_POSTGRES_DSN"]
    # what an older release left behind: a mart column of another type than the model's
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("alter table analytics.order_events alter column order_total type numeric")
    cli("produce", "--orders", "20", "--quiet", env=env)
    stale = cli("catch-up", env=env, check=False)
    assert stale.returncode == EXIT_MARTS_OUT_OF_DATE, stale.stdout + stale.stderr
    assert "orderflow catch-up --full-refresh" in stale.stderr
    rebuilt = cli("catch-up", "--full-refresh", env=env)
    assert "dbt models:   built" in rebuilt.stdout
    with psycopg.connect(dsn) as conn:
        column_type = conn.execute(
            "select format_type(atttypid, atttypmod) from pg_attribute"
            " where attrelid = 'analytics.order_events'::regclass and attname = 'order_total'"
        ).fetchone()[0]
        missing = conn.execute(
            "select count(*) from raw.order_events r where not exists"
            " (select 1 from analytics.order_events e where e.event_id = r.event_id)"
        ).fetchone()[0]
    assert column_type == "numeric(12,2)"
    assert missing == 0  # the later orders are in the rebuilt marts


def test_verify_checks_the_marts_keys_once_dbt_has_built_them(env):
    cli("produce", "--orders", "40", "--quiet", env=env)
    cli("catch-up", env=env)
    ok = cli("verify", env=env)
    assert "ok    no event_id twice in the marts" in ok.stdout
    assert "ok    one order_status row per order" in ok.stdout
    # a mart of a release without key constraints, holding an order twice
    with psycopg.connect(env["ORDERFLOW_POSTGRES_DSN"], autocommit=True) as conn:
        for (name,) in conn.execute(
            "select conname from pg_constraint"
            " where conrelid = 'analytics.order_status'::regclass and contype in ('p', 'u')"
        ).fetchall():
            conn.execute(
                sql.SQL("alter table analytics.order_status drop constraint {}").format(
                    sql.Identifier(name)
                )
            )
        conn.execute(
            "insert into analytics.order_status select * from analytics.order_status limit 1"
        )
    bad = cli("verify", env=env, check=False)
    assert bad.returncode == 1
    assert "FAIL  one order_status row per order" in bad.stdout
    assert "ok    no event_id twice in the marts" in bad.stdout
