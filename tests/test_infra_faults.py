"""Infrastructure failures are not poison: Kafka or Postgres dying in the middle of a batch leaves
nothing half-written, and the batch lands once they are back.

These tests stop and restart services, so they get a stack of their own (other ports, other
home) instead of the session's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from orderflow_dagster.stack import manager
from tests.support import invariants, produce_orders, wait_for_leaders
from tests.test_landing import GROUP, connections, land_all

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

LAND_ONE = """
import sys, psycopg
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.planner import plan_ranges
conn = psycopg.connect(sys.argv[1], autocommit=True)
store.ensure_schema(conn)
consumer = kafka_source.open_consumer(sys.argv[2], sys.argv[3])
plan = plan_ranges(conn, consumer, sys.argv[4], max_events_per_batch=100_000, max_inflight=1)
for r in plan.unlanded:
    land_range(r, conn=conn, consumer=consumer, run_id="faulty", chunk_rows=200, idle_timeout=8)
"""


@pytest.fixture(scope="module")
def faulty_stack():
    cfg = manager.StackConfig(
        home=Path(os.environ.get("ORDERFLOW_TEST_HOME", REPO / ".orderflow-test")) / "faults",
        kafka_port=int(os.environ.get("ORDERFLOW_TEST_FAULT_KAFKA_PORT", "29592")),
        postgres_port=int(os.environ.get("ORDERFLOW_TEST_FAULT_POSTGRES_PORT", "25932")),
        kafka_libs=REPO / ".orderflow" / "kafka" / "libs",
    )
    info = manager.start(cfg)
    yield cfg, info
    manager.stop(cfg)


def assert_nothing_half_written(conn, topic: str) -> None:
    """Every stored record lies in a ledger range, and every ledger range is complete."""
    outside, incomplete = conn.execute(
        """
        with stored as (
            select kafka_partition, kafka_offset from raw.order_events where topic = %(t)s
            union all
            select kafka_partition, kafka_offset from raw.dead_letters where topic = %(t)s
        ),
        ledger as (select * from raw.ingest_ledger where topic = %(t)s)
        select
            (select count(*) from stored s where not exists (
                select 1 from ledger l where l.kafka_partition = s.kafka_partition
                and s.kafka_offset >= l.start_offset and s.kafka_offset < l.end_offset)),
            (select count(*) from ledger l where l.end_offset - l.start_offset <> (
                select count(*) from stored s where s.kafka_partition = l.kafka_partition
                and s.kafka_offset >= l.start_offset and s.kafka_offset < l.end_offset))
        """,
        {"t": topic},
    ).fetchone()
    assert (outside, incomplete) == (0, 0)


def fresh(cfg, info):
    topic = f"orders.events.fault-{uuid.uuid4().hex[:8]}"
    manager.ensure_topics(info.bootstrap_servers, {topic: 4})
    return topic


def land_with_fault(
    info, topic, tmp_path, on_pause, point: str = "mid_copy"
) -> subprocess.CompletedProcess:
    """Land in a subprocess that pauses at `point`; `on_pause` breaks a service; then resume."""
    flag = tmp_path / f"pause-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "ORDERFLOW_PAUSE_AT": f"{point}:{flag}",
        # a tiny prefetch queue, so the rest of the range has to come from the broker
        "ORDERFLOW_KAFKA_CONFIG_QUEUED_MAX_MESSAGES_KBYTES": "16",
        "ORDERFLOW_KAFKA_CONFIG_MAX_PARTITION_FETCH_BYTES": "16384",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", LAND_ONE, info.dsn, info.bootstrap_servers, GROUP, topic],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the landing never reached {point}"
        time.sleep(0.05)
    on_pause()
    flag.unlink()
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _restart_postgres(cfg, info, topic) -> None:
    cfg.postgres_server().start()


def _restart_kafka(cfg, info, topic) -> None:
    cfg.kafka_broker().start()
    wait_for_leaders(info.bootstrap_servers, topic)


# service -> (how it dies, what the landing's error names, how it comes back)
FAULTS = {
    "postgres": (lambda cfg: cfg.postgres_server().kill, "psycopg", _restart_postgres),
    "kafka": (lambda cfg: cfg.kafka_broker().kill, "KafkaUnavailableError", _restart_kafka),
}


SCENARIOS = {
    "kafka": "4. Kafka broker kill -9 mid-batch",
    "postgres": "5. Postgres killed mid-batch",
}


@pytest.mark.faults
@pytest.mark.parametrize("service", sorted(FAULTS))
def test_a_service_dying_mid_batch_leaves_nothing_half_written_and_the_batch_lands_after_restart(
    faulty_stack, tmp_path, service, fault_report
):
    cfg, info = faulty_stack
    kill, error_name, restart = FAULTS[service]
    topic = fresh(cfg, info)
    outgoing = produce_orders(info.bootstrap_servers, topic, 600, poison_rate=0.02)
    result = land_with_fault(info, topic, tmp_path, kill(cfg))
    assert result.returncode != 0, result.stderr[-3000:]
    assert error_name in result.stderr, result.stderr[-2000:]
    recovery = time.monotonic()
    restart(cfg, info, topic)
    with connections(info.bootstrap_servers, info.dsn) as (conn, consumer):
        # the interrupted transaction left nothing behind; a range fully read before Kafka died
        # may have committed in Postgres, but no range is ever there in part
        assert_nothing_half_written(conn, topic)
        land_all(conn, consumer, topic, max_events=100_000)
        inv = invariants(conn, consumer, topic, len(outgoing))
        fault_report.record_invariants(
            SCENARIOS[service], inv, recovery_s=time.monotonic() - recovery
        )
        inv.assert_exactly_once()
    with psycopg.connect(info.dsn) as conn:
        assert conn.execute(
            "select count(*) from raw.order_events where topic = %s", (topic,)
        ).fetchone()[0] == sum(1 for o in outgoing if o.kind != "poison")


@pytest.mark.faults
def test_the_broker_killed_during_the_offset_commit_fails_typed_and_the_rerun_commits_the_ledger(
    faulty_stack, tmp_path, fault_report
):
    cfg, info = faulty_stack
    kill, error_name, restart = FAULTS["kafka"]
    topic = fresh(cfg, info)
    outgoing = produce_orders(info.bootstrap_servers, topic, 300, poison_rate=0.02)
    # the first range is committed in Postgres; the broker dies as its offsets go to Kafka
    result = land_with_fault(info, topic, tmp_path, kill(cfg), point="in_kafka_commit")
    recovery = time.monotonic()
    restart(cfg, info, topic)
    with connections(info.bootstrap_servers, info.dsn) as (conn, consumer):
        before = invariants(conn, consumer, topic, len(outgoing))
        assert_nothing_half_written(conn, topic)
        land_all(conn, consumer, topic, max_events=100_000)
        inv = invariants(conn, consumer, topic, len(outgoing))
    fault_report.record_invariants(
        "4. broker kill -9 during the offset commit", inv, recovery_s=time.monotonic() - recovery
    )
    assert result.returncode != 0, result.stderr[-3000:]
    assert error_name in result.stderr and "commit offsets" in result.stderr, result.stderr[-2000:]
    landed = {p: end for p, end in before.ledger_ends.items() if end is not None}
    assert len(landed) == 1, before
    # the commit that failed left Kafka behind the ledger, never ahead of it
    assert all(before.committed[p] is None for p in landed), before
    inv.assert_exactly_once()
