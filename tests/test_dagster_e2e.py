"""Dagster itself, end to end: the real daemon runs the sensor and the runs, the real webserver
serves the UI. Slow (each run is a fresh process), so CI runs them and `make test-fast` skips."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.scheduler.instigation import InstigatorType

from orderflow_dagster.defs.assets import offset_ranges
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.ranges import OffsetRange
from tests.dagster_processes import (
    dagster_daemon,
    dagster_webserver,
    free_port,
    make_dagster_home,
    orderflow_env,
    run_to_completion,
    wait_for_http,
    wait_until,
)
from tests.support import Invariants, invariants

ASSET = AssetKey("raw_order_events")
SENSOR = "kafka_offset_ranges_sensor"
PARTITION_TAG = "dagster/partition"
# 300 orders are ~1,130 messages, ~280 per Kafka partition: with 200 per range that is 2 ranges
# on each of the 4 partitions (8 runs). With one range in flight per partition, the second is
# planned by a later tick, after the first has landed.
ORDERS = 300
MAX_EVENTS_PER_BATCH = 200
MAX_INFLIGHT = 1
# ~60-90 s on an idle 2-core machine. Generous because the dbt builds that landings trigger share
# the two run slots, and each run is a fresh process that starts slowly on a busy machine.
LAND_TIMEOUT_S = 420
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def unlanded_planned_ranges(conn: psycopg.Connection, topic: str) -> int:
    return conn.execute(
        "select count(*) from raw.ingest_plan p where topic = %s and not exists ("
        " select 1 from raw.ingest_ledger l where l.topic = p.topic"
        " and l.kafka_partition = p.kafka_partition and l.start_offset = p.start_offset"
        " and l.end_offset = p.end_offset)",
        (topic,),
    ).fetchone()[0]


def ledger(conn: psycopg.Connection, topic: str) -> list[tuple[str, str, int, int]]:
    return conn.execute(
        "select partition_key, run_id, rows_landed, dead_letters from raw.ingest_ledger"
        " where topic = %s order by kafka_partition, start_offset",
        (topic,),
    ).fetchall()


def high_watermarks(consumer, topic: str) -> dict[int, int]:
    parts = kafka_source.partitions(consumer, topic)
    return {p: high for p, (_, high) in kafka_source.watermarks(consumer, topic, parts).items()}


def run_summary(instance: DagsterInstance) -> str:
    """Runs by status, and why the failed ones failed: the run workers' errors are in the event
    log, not in the daemon's output."""
    runs = instance.get_runs()
    text = str(Counter(f"{r.job_name}: {r.status.value}" for r in runs))
    for run in runs:
        if run.status == DagsterRunStatus.FAILURE:
            errors = [
                str(e.dagster_event.event_specific_data.error.message).strip()
                for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
                if e.dagster_event and e.dagster_event.event_specific_data
            ]
            text += f"\n  {run.run_id} {run.tags.get(PARTITION_TAG)}: {errors or 'no step failure'}"
    return text


class Progress:
    """What the test sees of the pipeline while it waits: the last invariants and plan state."""

    def __init__(
        self,
        conn: psycopg.Connection,
        consumer,
        instance: DagsterInstance,
        topic: str,
        produced: int,
    ) -> None:
        self.conn, self.consumer, self.instance = conn, consumer, instance
        self.topic, self.produced = topic, produced
        self.last: Invariants | None = None
        self.unlanded: int | None = None

    def landed_everything(self) -> Invariants | None:
        """The invariants once every produced message is landed and committed (lag zero)."""
        exists = self.conn.execute("select to_regclass('raw.ingest_ledger')").fetchone()[0]
        if exists is None:  # the sensor's first tick creates the schema
            return None
        self.last = invariants(self.conn, self.consumer, self.topic, self.produced)
        self.unlanded = unlanded_planned_ranges(self.conn, self.topic)
        inv = self.last
        done = (
            inv.raw_rows + inv.dead_letters == self.produced
            and inv.ledger_contiguous
            and self.unlanded == 0
            and inv.committed == inv.ledger_ends == high_watermarks(self.consumer, self.topic)
        )
        return inv if done else None

    def __str__(self) -> str:
        return (
            f"{self.last}, unlanded planned ranges: {self.unlanded}, "
            f"runs: {run_summary(self.instance)}"
        )


def wait_for_daemon_to_land(
    bed, topic: str, daemon, who: str, timeout_s: float = LAND_TIMEOUT_S
) -> Invariants:
    """Wait until the running `daemon` has landed and committed every message of the testbed's
    stream; fail early if the daemon dies, with the pipeline's state in the message. `bed` needs
    `conn`, `consumer`, `instance` and `outgoing`, as a `Testbed` has."""
    progress = Progress(bed.conn, bed.consumer, bed.instance, topic, len(bed.outgoing))
    return wait_until(
        progress.landed_everything,
        timeout_s=timeout_s,
        interval_s=2.0,
        what=f"{who} to land all {len(bed.outgoing)} messages of {topic}",
        watch=[daemon],
        describe=lambda: str(progress),
    )


def sensor_ticks(instance: DagsterInstance, limit: int = 5):
    states = [
        s
        for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        if s.instigator_name == SENSOR
    ]
    assert len(states) == 1, states
    return instance.get_ticks(states[0].instigator_origin_id, states[0].selector_id, limit=limit)


def landing_runs(instance: DagsterInstance):
    """The runs of raw_order_events partitions (the code location has other jobs, like dbt's)."""
    return [r for r in instance.get_runs() if PARTITION_TAG in r.tags]


def finished_landing_runs(instance: DagsterInstance):
    runs = landing_runs(instance)
    if not runs or any(not r.is_finished for r in runs):
        return None
    return runs


@pytest.mark.slow
def test_sensor_path_through_the_real_daemon_lands_a_stream_with_lag_zero(
    topic, tmp_path, dagster_testbed
):
    bed = dagster_testbed(
        orders=ORDERS,
        group_prefix="orderflow-e2e",
        extra={
            "ORDERFLOW_MAX_EVENTS_PER_BATCH": str(MAX_EVENTS_PER_BATCH),
            "ORDERFLOW_MAX_INFLIGHT": str(MAX_INFLIGHT),
        },
    )
    outgoing, env, conn, instance = bed.outgoing, bed.env, bed.conn, bed.instance
    with dagster_daemon(env, tmp_path / "logs") as daemon:
        started = time.monotonic()
        inv = wait_for_daemon_to_land(bed, topic, daemon, "the daemon")
        landed_s = time.monotonic() - started
        inv.assert_exactly_once()
        assert inv.dead_letters == sum(o.kind == "poison" for o in outgoing) > 0

        rows = ledger(conn, topic)
        keys = {key for key, *_ in rows}
        per_partition = Counter(OffsetRange.from_key(k).partition for k in keys)
        assert len(keys) == len(rows), rows
        assert set(per_partition) == {0, 1, 2, 3} and min(per_partition.values()) >= 2, rows
        assert sum(r for _, _, r, _ in rows) == inv.raw_rows
        assert sum(d for *_, d in rows) == inv.dead_letters

        # the last run commits its ledger row a moment before Dagster marks it done
        runs = wait_until(
            lambda: finished_landing_runs(instance),
            timeout_s=60,
            what="every landing run to finish",
            watch=[daemon],
            describe=lambda: run_summary(instance),
        )
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), run_summary(instance)
        # one run per range: no range was launched twice
        assert sorted(r.tags[PARTITION_TAG] for r in runs) == sorted(keys)
        by_id = {r.run_id: r for r in runs}
        for key, run_id, *_ in rows:  # each ledger row was written by its range's run
            assert by_id[run_id].tags[PARTITION_TAG] == key
        assert set(instance.get_dynamic_partitions(offset_ranges.name)) == keys
        assert instance.get_materialized_partitions(ASSET) == keys

        # every landing reports the topic's lag, as metadata the UI plots and as the kafka_lag
        # check; the last landing to commit saw nothing left
        materializations = instance.fetch_materializations(ASSET, limit=1000).records
        lags = [m.asset_materialization.metadata["topic_lag"].value for m in materializations]
        assert len(lags) == len(keys) and min(lags) == 0 and all(lag >= 0 for lag in lags)
        checks = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(ASSET, "kafka_lag"), limit=1000
        )
        assert {c.run_id for c in checks} == {r.run_id for r in runs}
        assert sorted(
            c.event.dagster_event.event_specific_data.metadata["lag"].value for c in checks
        ) == sorted(lags)

        # and the sensor itself reports the topic caught up
        tick = wait_until(
            lambda: next(
                (t for t in sensor_ticks(instance) if t.skip_reason == f"lag=0 on {topic}"),
                None,
            ),
            timeout_s=60,
            what="a sensor tick reporting lag=0",
            watch=[daemon],
        )
        assert not tick.run_keys
        summary = run_summary(instance)
    print(f"{len(outgoing)} messages in {len(rows)} ranges landed by the daemon in {landed_s:.1f}s")
    print(f"runs: {summary}")


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium is required for the Dagster UI test and was not found on PATH "
        f"(looked for {', '.join(CHROMIUM_NAMES)}); install it, e.g. `apt-get install -y chromium`",
        pytrace=False,
    )


def run_chromium(browser: str, profile: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return run_to_completion(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            f"--user-data-dir={profile}",
            # let the page's scripts and GraphQL queries settle before dumping or capturing
            "--virtual-time-budget=20000",
            "--window-size=1400,900",
            *extra,
            url,
        ],
        timeout_s=120,
    )


def png_summary(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decoded image data) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


@pytest.mark.slow
def test_dagster_ui_shows_the_raw_order_events_asset(
    kafka_bootstrap, postgres_dsn, topic, tmp_path
):
    browser = chromium()
    home = make_dagster_home(tmp_path / "dagster_home")
    env = orderflow_env(
        dagster_home=home,
        bootstrap_servers=kafka_bootstrap,
        dsn=postgres_dsn,
        topic=topic,
        consumer_group=f"orderflow-ui-{uuid.uuid4().hex[:8]}",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # the asset's lineage tab: its node in the graph, with its neighbours. (The global lineage at
    # /asset-groups collapses each group into one box once there are several groups.)
    page = f"{base}/assets/raw_order_events?view=lineage"
    profile = tmp_path / "chromium-profile"
    with dagster_webserver(env, tmp_path / "logs", port) as web:
        assert "dagster_webserver_version" in wait_for_http(f"{base}/server_info", web)

        last: dict[str, str] = {}

        def graph_rendered() -> str | None:
            out = run_chromium(browser, profile, page, "--dump-dom")
            last.update(stdout=out.stdout[-2000:], stderr=out.stderr[-2000:])
            dom = out.stdout
            # the asset's node in the graph carries its name as a tooltip and its kinds as tags
            # (only raw_order_events is of kind Kafka); the breadcrumb alone would have neither
            rendered = 'data-tooltip="raw_order_events"' in dom and ">Kafka<" in dom
            return dom if rendered else None

        wait_until(
            graph_rendered,
            timeout_s=120,
            interval_s=2.0,
            what=f"{page} to render the raw_order_events node",
            watch=[web],
            describe=lambda: str(last),
        )

        screenshot = tmp_path / "asset-lineage.png"
        out = run_chromium(browser, profile, page, f"--screenshot={screenshot}")
        assert screenshot.exists(), out.stderr[-2000:]
        width, height, distinct = png_summary(screenshot.read_bytes())
        assert (width, height) == (1400, 900)
        assert distinct > 32, "the screenshot is blank"
        print(f"screenshot of {page}: {screenshot}")


@pytest.mark.slow
@pytest.mark.faults
def test_the_daemon_killed_while_planning_and_launching_loses_and_duplicates_nothing(
    topic, tmp_path, fault_report, dagster_testbed
):
    import os
    import signal

    bed = dagster_testbed(
        orders=ORDERS,
        group_prefix="orderflow-kill",
        extra={
            "ORDERFLOW_MAX_EVENTS_PER_BATCH": str(MAX_EVENTS_PER_BATCH),
            "ORDERFLOW_MAX_INFLIGHT": str(MAX_INFLIGHT),
            "ORDERFLOW_RETRY_GRACE_SECONDS": "20",
        },
    )
    env, conn = bed.env, bed.conn

    def planned() -> int:
        if conn.execute("select to_regclass('raw.ingest_plan')").fetchone()[0] is None:
            return 0
        return conn.execute(
            "select count(*) from raw.ingest_plan where topic = %s", (topic,)
        ).fetchone()[0]

    with dagster_daemon(env, tmp_path / "logs-1") as daemon:
        # SIGKILL the daemon and everything it started (run workers included) as soon as
        # the sensor has planned ranges and asked for their runs: mid-tick or just after
        wait_until(
            lambda: planned() > 0 or None,
            timeout_s=240,
            interval_s=0.2,
            what="the sensor's first plan",
            watch=[daemon],
        )
        time.sleep(1.0)
        os.killpg(daemon.pid, signal.SIGKILL)
    recovery = time.monotonic()
    with dagster_daemon(env, tmp_path / "logs-2") as daemon:
        inv = wait_for_daemon_to_land(bed, topic, daemon, "the restarted daemon")
    fault_report.record_invariants(
        "3. Dagster daemon SIGKILLed mid-tick", inv, recovery_s=time.monotonic() - recovery
    )
    inv.assert_exactly_once()
    rows = ledger(conn, topic)
    keys = [key for key, *_ in rows]
    assert len(keys) == len(set(keys))  # every range landed once
    assert sum(r for _, _, r, _ in rows) == inv.raw_rows
