"""Database defaults a DBA may set (isolation level, read-only, timeouts) change nothing.

Every client session of the pipeline states what its transactions need (read committed, read
write, no timeouts on the landing's deliberate waits), so `alter database ... set
default_transaction_isolation = 'repeatable read'` and the like cannot make two landings both
audit `landed`, two planners hand out overlapping ranges, two replays fail each other, or two
dbt builds read each other's marts from a stale snapshot. Real Kafka, Postgres and dbt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import psycopg
import pytest
from oracle import expected_order_status, landed, read_customers_csv
from psycopg import sql

from orderflow_dagster.defs.resources import PostgresResource
from orderflow_dagster.ingest.generator import Outgoing, generate
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.parse import Reason
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.serve.verify import verify
from orderflow_dagster.transform.dbt import DBT_PROJECT_DIR, run_dbt_build
from tests.support import invariants, mart_duplicates, produce
from tests.test_order_status_e2e import actual_rows

CUSTOMERS = read_customers_csv(DBT_PROJECT_DIR / "seeds" / "customers.csv")
SCENARIO = "16. database default isolation"

REPEATABLE_READ = {"default_transaction_isolation": "repeatable read"}
SERIALIZABLE = {
    "default_transaction_isolation": "serializable",
    "default_transaction_deferrable": "on",
}
# what a cautious DBA might set besides: every one of them would fail a landing that waits for
# another (the settle lock below is held longer than each) or make it unable to write
GUARDED = {
    **REPEATABLE_READ,
    "default_transaction_read_only": "on",
    "statement_timeout": "1s",
    "lock_timeout": "500ms",
    "idle_in_transaction_session_timeout": "1s",
    "transaction_timeout": "2s",
}
GUARDED_HOLD_S = 3.0


def set_database_defaults(dsn: str, defaults: Mapping[str, str]) -> None:
    """`alter database <this one> set <name> = <value>` for each: what new sessions start with."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in defaults.items():
            conn.execute(
                sql.SQL("alter database {} set {} = {}").format(
                    sql.Identifier(dbname), sql.Identifier(name), sql.Literal(value)
                )
            )


def reset_database_defaults(dsn: str, names: list[str]) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = off")
        for name in names:
            conn.execute(
                sql.SQL("alter database {} reset {}").format(
                    sql.Identifier(dbname), sql.Identifier(name)
                )
            )


def waiting_on(dsn: str, wait_events: tuple[str, ...]) -> int:
    """Backends of this test's database waiting on a lock of one of those kinds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and wait_event_type = 'Lock' and wait_event = any(%s)",
            (list(wait_events),),
        ).fetchone()[0]


def wait_for_waiters(
    dsn: str, count: int, wait_events: tuple[str, ...] = ("advisory",), timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while waiting_on(dsn, wait_events) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} sessions came to wait on a lock of {wait_events}")
        time.sleep(0.05)


@contextmanager
def advisory_lock_held(dsn: str, *key: int) -> Iterator[Callable[[], None]]:
    """Holds a session advisory lock (the one a pipeline step takes per transaction) until the
    yielded `release` is called or the block ends."""
    conn = psycopg.connect(dsn, autocommit=True)
    placeholders = sql.SQL(", ").join([sql.Placeholder()] * len(key))
    conn.execute(sql.SQL("select pg_advisory_lock({})").format(placeholders), key)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            conn.execute(sql.SQL("select pg_advisory_unlock({})").format(placeholders), key)
            released = True

    try:
        yield release
    finally:
        release()
        conn.close()


def topic_hash(dsn: str, text: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select hashtext(%s)", (text,)).fetchone()[0]


def in_threads(*targets: Callable[[], object]) -> tuple[list[threading.Thread], list]:
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    return threads, errors


def with_copies_on_the_next_partition(outgoing: list[Outgoing]) -> list[Outgoing]:
    """Each event once on its key's partition and once more, byte for byte, on the next one (a
    re-keyed resend): copies of one event_id that concurrent landings of two partitions hold."""
    copies = [
        Outgoing(
            b"resent-" + (o.key or b""), o.value, ((o.partition or 0) + 1) % 4, "duplicate", o.event
        )
        for o in outgoing
    ]
    return [*outgoing, *copies]


def expected_rows(outgoing: list[Outgoing]) -> list[dict]:
    # copies are byte-identical, so which one wins does not change order_status
    records = [
        landed(
            o.event,
            topic="t",
            kafka_partition=0,
            kafka_offset=n,
            landed_at=0,
            trace_id=o.event.get("trace_id"),
        )
        for n, o in enumerate(outgoing)
        if o.event is not None
    ]
    return expected_order_status(records, CUSTOMERS)


def assert_marts_exact(dsn: str, outgoing: list[Outgoing]) -> int:
    with psycopg.connect(dsn) as conn:
        duplicates = mart_duplicates(conn)
        landed_ids, mart_ids = conn.execute(
            "select (select count(distinct event_id) from raw.order_events),"
            " (select count(*) from analytics.order_events)"
        ).fetchone()
    assert duplicates == 0
    assert mart_ids == landed_ids
    actual, expected = actual_rows(dsn), expected_rows(outgoing)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == e, {k: (a.get(k), e.get(k)) for k in set(a) | set(e) if a.get(k) != e.get(k)}
    return duplicates


def invariants_of(conn, bootstrap: str, group: str, topic: str, produced: int):
    consumer = kafka_source.open_consumer(bootstrap, group)
    try:
        return invariants(conn, consumer, topic, produced)
    finally:
        consumer.close()


@pytest.mark.faults
@pytest.mark.parametrize(
    "defaults",
    [REPEATABLE_READ, SERIALIZABLE, GUARDED],
    ids=["repeatable-read", "serializable-deferrable", "read-only-with-timeouts"],
)
def test_concurrent_landings_of_copies_on_other_partitions_audit_one_landed_whatever_the_default(
    kafka_bootstrap, postgres_dsn, topic, defaults, fault_report, monkeypatch
):
    """Four partitions land at once, each holding copies of another's events, all of them
    classified before any commits (the topic's settle lock is held until every landing waits
    for it). Whatever isolation, read-only or timeout the database starts sessions with, every
    event_id is audited `landed` once, verify passes, and dbt builds exact marts."""
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", "analytics")
    set_database_defaults(postgres_dsn, defaults)
    events = list(generate(40, seed=16, duplicate_rate=0, poison_rate=0))
    outgoing = with_copies_on_the_next_partition(events)
    produce(kafka_bootstrap, topic, outgoing)
    group = f"isolation-{topic}"
    postgres = PostgresResource(dsn=postgres_dsn)
    with postgres.connect() as conn:
        consumer = kafka_source.open_consumer(kafka_bootstrap, group)
        try:
            plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=4)
        finally:
            consumer.close()
    assert sorted(r.partition for r in plan.unlanded) == [0, 1, 2, 3]

    def landing(rng):
        def land():
            consumer = kafka_source.open_consumer(kafka_bootstrap, group)
            try:
                with postgres.connect() as conn:
                    land_range(rng, conn=conn, consumer=consumer, run_id=f"isolation-{rng.key}")
            finally:
                consumer.close()

        return land

    with advisory_lock_held(
        postgres_dsn, store.LOCK_AUDIT, topic_hash(postgres_dsn, topic)
    ) as release:
        threads, errors = in_threads(*(landing(r) for r in plan.unlanded))
        wait_for_waiters(postgres_dsn, len(plan.unlanded))
        if defaults is GUARDED:
            time.sleep(GUARDED_HOLD_S)  # past every timeout the database sets
        # the recovery: the landings settling against each other, until verify passes
        started = time.monotonic()
        release()
        for thread in threads:
            thread.join(120)
    assert not errors, errors

    checks, lag = verify(postgres_dsn, kafka_bootstrap, topic, group, "analytics")
    recovery_s = time.monotonic() - started
    assert [c for c in checks if not c.ok] == [] and lag == 0
    with psycopg.connect(postgres_dsn) as conn:
        inv = invariants_of(conn, kafka_bootstrap, group, topic, len(outgoing))
        landed_once = conn.execute(
            "select count(*) filter (where outcome = 'landed'),"
            " count(distinct event_id) filter (where outcome = 'landed')"
            " from audit.ingest_log where topic = %s",
            (topic,),
        ).fetchone()
    inv.assert_exactly_once()
    assert landed_once == (len(events), len(events))

    if defaults is GUARDED:
        # dbt keeps the DBA's timeouts (a timed-out build fails loudly and runs again); it is
        # pinned to read committed and read write
        reset_database_defaults(postgres_dsn, [n for n in GUARDED if n.endswith("timeout")])
    run_dbt_build(postgres_dsn)
    duplicates = assert_marts_exact(postgres_dsn, outgoing)
    checks, _ = verify(postgres_dsn, kafka_bootstrap, topic, group, "analytics")
    assert [c for c in checks if not c.ok] == []
    level = defaults["default_transaction_isolation"]
    fault_report.record_invariants(
        f"{SCENARIO} {level}", inv, recovery_s=recovery_s, mart_duplicates=duplicates
    )


def land_everything(kafka_bootstrap: str, dsn: str, topic: str, group: str) -> None:
    postgres = PostgresResource(dsn=dsn)
    consumer = kafka_source.open_consumer(kafka_bootstrap, group)
    try:
        with postgres.connect() as conn:
            plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=4)
            for rng in plan.unlanded:
                land_range(rng, conn=conn, consumer=consumer, run_id=f"isolation-{rng.key}")
    finally:
        consumer.close()


def materialize_dbt_asset() -> None:
    from dagster import materialize

    from orderflow_dagster.transform import dbt_resource, orderflow_dbt_models

    result = materialize([orderflow_dbt_models], resources={"dbt": dbt_resource()})
    assert result.success


# the lock every incremental mart takes first (macros/serialize_incremental_runs.sql)
DBT_LOCK = "orderflow.dbt.incremental_marts"


@pytest.mark.faults
def test_overlapping_dbt_builds_under_a_repeatable_read_default_keep_the_marts_exact(
    kafka_bootstrap, postgres_dsn, topic, fault_report, monkeypatch
):
    """Two dbt builds overlap: both wait for the incremental marts' lock, and the second reads
    what the first just committed. Under a REPEATABLE READ default its snapshot would predate
    that commit (taken by the lock statement) and it would append event_copies rows a second
    time. Run both ways round, so the headless build and the Dagster asset each come second."""
    from orderflow_dagster.transform.dbt import dbt_env_from_dsn

    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", "analytics")
    monkeypatch.setenv("ORDERFLOW_POSTGRES_DSN", postgres_dsn)
    # the asset sets these in this process; undo that after the test
    for name, value in dbt_env_from_dsn(postgres_dsn).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PGOPTIONS", os.environ.get("PGOPTIONS", ""))
    set_database_defaults(postgres_dsn, REPEATABLE_READ)
    group = f"isolation-dbt-{topic}"
    everything: list[Outgoing] = []

    def land_round(seed: int) -> None:
        outgoing = list(generate(30, seed=seed, duplicate_rate=0.1, poison_rate=0.05))
        produce(kafka_bootstrap, topic, outgoing)
        everything.extend(outgoing)
        land_everything(kafka_bootstrap, postgres_dsn, topic, group)

    land_round(1)
    run_dbt_build(postgres_dsn)
    started = time.monotonic()
    dbt_lock = topic_hash(postgres_dsn, DBT_LOCK)
    for seed, asset_second in ((2, True), (3, False)):
        land_round(seed)
        with advisory_lock_held(postgres_dsn, dbt_lock) as release:

            def headless_then_release(wait_first: bool):
                def run():
                    if wait_first:  # the asset is waiting already: come second
                        wait_for_waiters(postgres_dsn, 1)
                    threads, errors = in_threads(lambda: run_dbt_build(postgres_dsn))
                    wait_for_waiters(postgres_dsn, 2)
                    release()
                    threads[0].join(300)
                    if errors:
                        raise errors[0]

                return run

            threads, errors = in_threads(headless_then_release(wait_first=not asset_second))
            if asset_second:
                wait_for_waiters(postgres_dsn, 1)
            materialize_dbt_asset()  # in the main thread: dagster-dbt handles signals there
            threads[0].join(300)
        assert not errors, errors
        assert_marts_exact(postgres_dsn, everything)

    with psycopg.connect(postgres_dsn) as conn:
        inv = invariants_of(conn, kafka_bootstrap, group, topic, len(everything))
        duplicates = mart_duplicates(conn)
    inv.assert_exactly_once()
    fault_report.record_invariants(
        f"{SCENARIO} repeatable read",
        inv,
        recovery_s=time.monotonic() - started,
        mart_duplicates=duplicates,
    )


def test_two_planners_waiting_for_each_other_under_repeatable_read_plan_disjoint_ranges(
    kafka_bootstrap, postgres_dsn, topic
):
    """The second planner reads the first one's plan after the lock: under a REPEATABLE READ
    default it would plan from a snapshot taken before its wait, over the same offsets."""
    set_database_defaults(postgres_dsn, REPEATABLE_READ)
    postgres = PostgresResource(dsn=postgres_dsn)
    group = f"isolation-plan-{topic}"
    with postgres.connect():
        pass  # the schema, before the planners race
    produce(kafka_bootstrap, topic, list(generate(20, seed=4, poison_rate=0)))
    planned = []

    def planner():
        consumer = kafka_source.open_consumer(kafka_bootstrap, group)
        try:
            with postgres.connect() as conn:
                planned.append(
                    plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=9)
                )
        finally:
            consumer.close()

    key = topic_hash(postgres_dsn, topic)
    with advisory_lock_held(postgres_dsn, store.LOCK_PLANNING, key) as release:
        first, first_errors = in_threads(planner)
        wait_for_waiters(postgres_dsn, 1)
        # more records after the first planner read the watermarks: the second plans further
        produce(kafka_bootstrap, topic, list(generate(20, seed=5, poison_rate=0)))
        second, second_errors = in_threads(planner)
        wait_for_waiters(postgres_dsn, 2)
        release()
        for thread in first + second:
            thread.join(60)
    assert not first_errors and not second_errors
    with psycopg.connect(postgres_dsn) as conn:
        overlapping = conn.execute(
            "select count(*) from raw.ingest_plan a join raw.ingest_plan b"
            " on a.topic = b.topic and a.kafka_partition = b.kafka_partition"
            " and a.partition_key < b.partition_key"
            " and a.start_offset < b.end_offset and b.start_offset < a.end_offset"
            " where a.topic = %s",
            (topic,),
        ).fetchone()[0]
    assert overlapping == 0
    # and the second planner's ranges start where the first one's end
    assert planned[0].new and planned[1].new
    assert {r.key for r in planned[0].new}.isdisjoint(r.key for r in planned[1].new)


def test_two_replays_of_the_same_dead_letters_under_repeatable_read_land_them_once(
    kafka_bootstrap, postgres_dsn, topic, cli_env
):
    """Two `orderflow dlq replay` at once: the second waits for the first's row locks and then
    skips what the first replayed, where a REPEATABLE READ default would fail it instead
    (could not serialize access due to concurrent update)."""
    set_database_defaults(postgres_dsn, REPEATABLE_READ)
    events = list(generate(10, seed=6, duplicate_rate=0, poison_rate=0))
    produce(kafka_bootstrap, topic, events)
    group = f"isolation-dlq-{topic}"
    # an oversize limit below every event: all of them are dead-lettered, to be replayed
    postgres = PostgresResource(dsn=postgres_dsn)
    consumer = kafka_source.open_consumer(kafka_bootstrap, group)
    try:
        with postgres.connect() as conn:
            plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=4)
            for rng in plan.unlanded:
                land_range(rng, conn=conn, consumer=consumer, run_id="tiny", max_message_bytes=10)
            reasons = conn.execute(
                "select reason, count(*) from raw.dead_letters where topic = %s group by 1",
                (topic,),
            ).fetchall()
    finally:
        consumer.close()
    assert reasons == [(Reason.OVERSIZE, len(events))]
    env = cli_env(group=group, max_events_per_batch=10_000)
    replay = [sys.executable, "-m", "orderflow_dagster.cli", "dlq", "replay", "--all"]
    with psycopg.connect(postgres_dsn) as blocker:
        # hold the dead letters' row locks until both replays wait for them
        blocker.execute("select 1 from raw.dead_letters where topic = %s for update", (topic,))
        procs = [
            subprocess.Popen(
                replay, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        try:
            # the first waits for the blocker's transaction, the second for the first's tuple lock
            wait_for_waiters(postgres_dsn, 2, ("transactionid", "tuple"))
        finally:
            blocker.rollback()
        outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    replayed = sorted(int(out.split("replayed ")[1].split(";")[0]) for out, _ in outputs)
    assert replayed == [0, len(events)]
    with psycopg.connect(postgres_dsn) as conn:
        rows, audited = conn.execute(
            "select (select count(*) from raw.order_events where topic = %s),"
            " (select count(*) from audit.ingest_log where topic = %s and outcome = 'replayed')",
            (topic, topic),
        ).fetchone()
    assert rows == audited == len(events)
