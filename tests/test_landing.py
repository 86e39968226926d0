"""Landing ranges exactly once, against the real broker and Postgres."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

import psycopg
import pytest

from orderflow_dagster.ingest.producer import EventProducer, emit_event
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range, repair_kafka_commits
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import OffsetRange
from tests.support import invariants, produce_orders, table_checksums

GROUP = "orderflow-test"


@contextmanager
def connections(bootstrap: str, dsn: str, group: str = GROUP):
    conn = psycopg.connect(dsn, autocommit=True)
    consumer = kafka_source.open_consumer(bootstrap, group)
    try:
        store.ensure_schema(conn)
        yield conn, consumer
    finally:
        consumer.close()
        conn.close()


def land_all(conn, consumer, topic, *, max_events=50, max_inflight=100, run_id="test-run"):
    plan = plan_ranges(
        conn, consumer, topic, max_events_per_batch=max_events, max_inflight=max_inflight
    )
    results = [land_range(r, conn=conn, consumer=consumer, run_id=run_id) for r in plan.unlanded]
    repair_kafka_commits(conn, consumer, topic)  # as every sensor tick and catch-up run does
    return results


def test_a_stream_with_duplicates_and_poison_lands_exactly_once(
    kafka_bootstrap, postgres_dsn, topic
):
    outgoing = produce_orders(kafka_bootstrap, topic, 150, duplicate_rate=0.1, poison_rate=0.05)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        results = land_all(conn, consumer, topic)
        inv = invariants(conn, consumer, topic, len(outgoing))
        inv.assert_exactly_once()
        poison = [o for o in outgoing if o.kind == "poison"]
        assert inv.dead_letters == len(poison) > 0
        # every poison message is dead-lettered under the reason it was built to trigger
        reasons = Counter(
            r
            for (r,) in conn.execute(
                "select reason from raw.dead_letters where topic = %s", (topic,)
            )
        )
        assert reasons == Counter(o.poison_reason for o in poison)
        # and its bytes survive as they were sent (NUL bytes, invalid UTF-8 included)
        stored = {
            bytes(v)
            for (v,) in conn.execute(
                "select value from raw.dead_letters where topic = %s", (topic,)
            )
        }
        assert stored == {o.value for o in poison}
    assert sum(r.rows_landed for r in results) == inv.raw_rows
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        outcomes = dict(
            conn.execute(
                "select outcome, count(*) from audit.ingest_log where topic = %s group by 1",
                (topic,),
            ).fetchall()
        )
        distinct = conn.execute(
            "select count(distinct event_id) from raw.order_events where topic = %s", (topic,)
        ).fetchone()[0]
    # the audit log has one row per record: the first copy of each event_id landed, the
    # copies after it flagged as duplicates, the poison dead-lettered
    assert outcomes == {
        "landed": distinct,
        "duplicate": inv.raw_rows - distinct,
        "dead_lettered": inv.dead_letters,
    }
    assert outcomes["duplicate"] == sum(o.kind == "duplicate" for o in outgoing) > 0


@pytest.mark.faults
def test_landing_the_same_partition_twice_leaves_identical_tables(
    kafka_bootstrap, postgres_dsn, topic, fault_report
):
    outgoing = produce_orders(kafka_bootstrap, topic, 60, poison_rate=0.05)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        first = land_all(conn, consumer, topic)
        before = table_checksums(conn, topic)
        rerun = time.monotonic()
        again = [land_range(r.range, conn=conn, consumer=consumer, run_id="rerun") for r in first]
        inv = invariants(conn, consumer, topic, len(outgoing))
        fault_report.record_invariants(
            "7. backfill of landed ranges", inv, recovery_s=time.monotonic() - rerun
        )
        inv.assert_exactly_once()
        assert table_checksums(conn, topic) == before
        assert all(r.rows_landed == 0 and r.already_landed == r.range.size for r in again)


def test_landing_overlapping_ranges_adds_no_row_twice(kafka_bootstrap, postgres_dsn, topic):
    outgoing = produce_orders(kafka_bootstrap, topic, 60)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        high = kafka_source.watermarks(consumer, topic, [0])[0][1]
        assert high > 10
        a = land_range(
            OffsetRange(topic, 0, 0, high // 2 + 3), conn=conn, consumer=consumer, run_id="a"
        )
        b = land_range(
            OffsetRange(topic, 0, high // 2 - 3, high), conn=conn, consumer=consumer, run_id="b"
        )
        assert b.already_landed == 6
        count = conn.execute(
            "select count(*) from raw.order_events where topic = %s and kafka_partition = 0",
            (topic,),
        ).fetchone()[0]
        dead = conn.execute(
            "select count(*) from raw.dead_letters where topic = %s and kafka_partition = 0",
            (topic,),
        ).fetchone()[0]
        assert count + dead == high == a.messages_read + b.messages_read
    assert outgoing


@pytest.mark.parametrize("ids", ["ascending", "descending"])
def test_a_copy_in_a_later_gap_of_one_landing_is_a_duplicate(
    kafka_bootstrap, postgres_dsn, topic, ids
):
    """A landing with two gaps counts its own first gap as landed before its second.

    Ascending ids take the audit's shortcut (ids above the greatest landed before the gap skip
    the probe), so the greatest id must be read again after the first gap: the copy at offset 6
    is above every id landed before the landing began. Descending ids take the probe path."""

    def event_id(n: int) -> str:
        return f"{n if ids == 'ascending' else 100 - n:08x}-0000-7000-8000-000000000000"

    # offsets 0-6 of one partition (one key); offsets 2-3 are landed first, so the landing of
    # 0-7 has two gaps, [0, 2) and [4, 7); offset 6 is a copy of offset 1
    sent = [event_id(n) for n in (3, 4, 1, 2, 5, 6, 4)]
    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        for sent_id in sent:
            emit_event(
                "ord-gaps",
                "OrderCancelled",
                {"reason": "r"},
                event_id=sent_id,
                topic=topic,
                producer=producer,
            )
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=100, max_inflight=4)
        (whole,) = plan.unlanded
        assert whole.size == 7
        land_range(
            OffsetRange(topic, whole.partition, 2, 4), conn=conn, consumer=consumer, run_id="middle"
        )
        landed = land_range(whole, conn=conn, consumer=consumer, run_id="both-gaps")
        assert (landed.rows_landed, landed.already_landed) == (5, 2)
        outcomes = dict(
            conn.execute(
                "select kafka_offset, outcome from audit.ingest_log"
                " where topic = %s and kafka_partition = %s",
                (topic, whole.partition),
            ).fetchall()
        )
    assert outcomes == {offset: "landed" for offset in range(6)} | {6: "duplicate"}


def test_the_kafka_commit_never_passes_a_gap(kafka_bootstrap, postgres_dsn, topic):
    produce_orders(kafka_bootstrap, topic, 80)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10, max_inflight=100)
        p0 = [r for r in plan.unlanded if r.partition == 0]
        assert len(p0) >= 3
        # land the second and third range first: the first has not landed, so nothing commits
        for r in p0[1:3]:
            land_range(r, conn=conn, consumer=consumer, run_id="out-of-order")
        assert kafka_source.committed(consumer, topic, [0])[0] is None
        land_range(p0[0], conn=conn, consumer=consumer, run_id="first")
        assert kafka_source.committed(consumer, topic, [0])[0] == p0[2].end


@pytest.mark.faults
def test_two_runs_of_the_same_range_at_once_land_it_once(
    kafka_bootstrap, postgres_dsn, topic, fault_report
):
    outgoing = produce_orders(kafka_bootstrap, topic, 100)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
    results = []
    # nothing is restarted here: the "recovery" is the two racing runs themselves
    started = time.monotonic()

    def run(name):
        with connections(kafka_bootstrap, postgres_dsn) as (c, k):
            results.append([land_range(r, conn=c, consumer=k, run_id=name) for r in plan.unlanded])

    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        inv = invariants(conn, consumer, topic, len(outgoing))
    fault_report.record_invariants(
        "6. two runs of one range at once", inv, recovery_s=time.monotonic() - started
    )
    inv.assert_exactly_once()
    assert len(results) == 2
    # per range: one run landed it, the other found it in the ledger and did nothing
    for first, second in zip(*results, strict=True):
        assert first.range == second.range
        work = sorted([first.messages_read, second.messages_read])
        assert work[0] == 0 and work[1] > 0
        assert sorted([first.already_landed, second.already_landed]) == [0, first.range.size]


CRASH_SCRIPT = """
import sys, psycopg
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.landing import land_range, repair_kafka_commits
from orderflow_dagster.land.ranges import OffsetRange
conn = psycopg.connect(sys.argv[1], autocommit=True)
consumer = kafka_source.open_consumer(sys.argv[2], sys.argv[3])
land_range(OffsetRange.from_key(sys.argv[4]), conn=conn, consumer=consumer, run_id="crashing")
"""


@pytest.mark.parametrize(
    ("crash_at", "ledger_after_crash"),
    [
        ("before_copy", 0),
        ("mid_copy", 0),
        ("after_copy_before_commit", 0),
        ("after_db_commit_before_kafka_commit", 1),
        ("in_kafka_commit", 1),
    ],
)
@pytest.mark.faults
def test_a_crash_at_any_point_loses_nothing_and_duplicates_nothing_after_a_rerun(
    kafka_bootstrap, postgres_dsn, topic, crash_at, ledger_after_crash, fault_report
):
    outgoing = produce_orders(kafka_bootstrap, topic, 40, poison_rate=0.05)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.size > 0)
    env = {**os.environ, "ORDERFLOW_CRASH_AT": crash_at}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, postgres_dsn, kafka_bootstrap, GROUP, victim.key],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr  # SIGKILLed itself at the crash point
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        ledger = conn.execute(
            "select count(*) from raw.ingest_ledger where partition_key = %s", (victim.key,)
        ).fetchone()[0]
        assert ledger == ledger_after_crash
        # Kafka is never ahead of Postgres, whatever the crash point
        assert kafka_source.committed(consumer, topic, [victim.partition])[victim.partition] is None
        rerun = time.monotonic()
        land_all(conn, consumer, topic, max_events=10_000)
        inv = invariants(conn, consumer, topic, len(outgoing))
        fault_report.record_invariants(
            f"1. SIGKILL at {crash_at}", inv, recovery_s=time.monotonic() - rerun
        )
        inv.assert_exactly_once()


def explain_every_statement(conn: psycopg.Connection) -> list[str]:
    """From now on, the plan of every statement the session runs, nested ones included (as
    executed inside functions), is appended to the returned list as JSON text (auto_explain)."""
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
    conn.execute("load 'auto_explain'")
    for name, value in {
        "auto_explain.log_min_duration": "0",
        "auto_explain.log_nested_statements": "on",
        "auto_explain.log_format": "json",
        "auto_explain.log_level": "notice",
        "client_min_messages": "notice",
    }.items():
        conn.execute("select set_config(%s, %s, false)", (name, value))
    return plans


def plans_of(plans: list[str], statement_text: str) -> list[dict]:
    """The plans (JSON) of the statements whose text contains `statement_text`."""
    return [
        json.loads(text[text.index("{") :])["Plan"]
        for text in plans
        if "{" in text and statement_text in text.lower()
    ]


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _joins_without_an_index(plan: dict) -> list[str]:
    """Nested loops whose inner side scans without an index: quadratic in the range size."""
    return [
        f"nested loop over {node['Plans'][1]['Node Type']}"
        for node in _nodes(plan)
        if node["Node Type"] == "Nested Loop"
        and node["Plans"][1]["Node Type"] not in ("Index Scan", "Index Only Scan")
    ]


def test_the_audit_and_the_greatest_id_lookup_use_the_event_id_index_and_never_scan(
    kafka_bootstrap, postgres_dsn, topic
):
    """The audit classifies each landed row with one index probe; a scan of the events per row
    would be quadratic in the table (the shape that once took hours for a 100,000-event range).
    The plan is the one Postgres really executed inside audit.log_landing (auto_explain)."""
    produce_orders(kafka_bootstrap, topic, 300, duplicate_rate=0.1)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_all(conn, consumer, topic, max_events=100)
        conn.execute("analyze raw.order_events, raw.dead_letters")
        produce_orders(kafka_bootstrap, topic, 300, seed=2, duplicate_rate=0.1)
        plans = explain_every_statement(conn)
        landed = land_all(conn, consumer, topic, max_events=10_000, run_id="past-the-stats")
        assert sum(r.rows_landed for r in landed) > 1000
    audits = plans_of(plans, "insert into audit.ingest_log")
    assert audits, "auto_explain reported no plan for the audit insert"
    for plan in audits:
        nodes = list(_nodes(plan))
        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], plan
        assert _joins_without_an_index(plan) == [], plan
        probes = [
            n
            for n in nodes
            if n.get("Parent Relationship") == "SubPlan"
            and n.get("Relation Name") == "order_events"
        ]
        assert probes and all(
            n["Node Type"] in ("Index Scan", "Index Only Scan")
            and n["Index Name"] == "order_events_event_id"
            for n in probes
        ), plan
    # the greatest landed event_id, read before each gap: one step down the index, not a scan
    greatest = plans_of(plans, "order by event_id desc limit 1")
    assert greatest, "auto_explain reported no plan for the greatest event_id"
    for plan in greatest:
        scans = [
            (n["Node Type"], n.get("Index Name"))
            for n in _nodes(plan)
            if n.get("Relation Name") == "order_events"
        ]
        assert len(scans) == 1, plan
        assert scans[0] in {
            ("Index Only Scan", "order_events_event_id"),
            ("Index Scan", "order_events_event_id"),
        }, plan


def test_settling_probes_the_event_id_index_for_each_row_of_a_concurrent_landing(postgres_dsn):
    """Settling against another partition's landing probes the event_id index once per row of
    theirs. Given the topic and partition as well, the planner once chose the primary key,
    whose statistics predate the rows just written, and read every row of ours for each row of
    theirs: minutes for two concurrent landings of 10,000 events, hours for 100,000."""
    rows = 2000
    insert = (
        "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
        " aggregate_id, event_type, schema_version, event_ts_ms, payload, run_id)"
        " select 'settle.t', %(p)s, g, md5(%(p)s || '-' || g)::uuid, 'ord-' || g,"
        " 'OrderCancelled', 1, 0, '{}', %(run)s from generate_series(0, %(n)s - 1) g"
    )
    ours, theirs = OffsetRange("settle.t", 0, 0, rows), OffsetRange("settle.t", 1, 0, rows)
    with (
        psycopg.connect(postgres_dsn, autocommit=True) as setup,
        psycopg.connect(postgres_dsn) as conn,
        psycopg.connect(postgres_dsn) as other,
    ):
        store.ensure_schema(setup)
        setup.execute("analyze raw.order_events")  # statistics of an empty table
        snapshot = store.classification_snapshot(conn)
        conn.execute(insert, {"p": 0, "n": rows, "run": "ours"})
        other.execute(insert, {"p": 1, "n": rows, "run": "theirs"})
        store.record_landing(other, store.LedgerEntry(theirs, rows, rows, 0, 0, "theirs", 1))
        other.commit()
        plans = explain_every_statement(conn)
        store.settle_landing(conn, ours, [(0, rows)], "ours", snapshot)
        conn.rollback()
    probes = [
        node
        for plan in plans_of(plans, "from raw.order_events o")
        for node in _nodes(plan)
        # o: their rows, read by the primary key; any other scan of the events is a probe
        if node.get("Relation Name") == "order_events" and node.get("Alias") != "o"
    ]
    assert probes, "auto_explain reported no plan for the settle probe"
    # an index scan of event_id, or a bitmap heap scan over one
    used = [
        n.get("Index Name") or [c.get("Index Name") for c in n.get("Plans", [])] for n in probes
    ]
    assert all(u in ("order_events_event_id", ["order_events_event_id"]) for u in used), probes


def test_a_copy_committed_on_another_partition_during_a_landing_makes_it_a_duplicate(
    kafka_bootstrap, postgres_dsn, topic
):
    """Another partition's landing commits a copy of one of our events after we classified it
    as `landed`: settling the landing finds the copy, the transaction is landed again, and the
    audit log says `duplicate` for ours. Never two `landed` for one event_id."""
    produce_orders(kafka_bootstrap, topic, 40, duplicate_rate=0, poison_rate=0)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        mine = plan.unlanded[0]
        (first,) = next(
            kafka_source.read_span(consumer, topic, mine.partition, mine.start, mine.start + 1)
        )
        event_id = json.loads(first.value())["event_id"]
        # the other landing: a copy on the next partition, classified, holding the topic's
        # settle lock, not yet committed
        theirs = OffsetRange(topic, (mine.partition + 1) % 4, 10**9, 10**9 + 1)
        other = psycopg.connect(postgres_dsn)
        snapshot = store.classification_snapshot(other)
        other.execute(
            "insert into raw.order_events (topic, kafka_partition, kafka_offset, event_id,"
            " aggregate_id, event_type, schema_version, event_ts_ms, payload, run_id)"
            " values (%s, %s, %s, %s, 'ord-x', 'OrderCancelled', 1, 0, '{}', 'theirs')",
            (topic, theirs.partition, theirs.start, event_id),
        )
        store.settle_landing(other, theirs, [(theirs.start, theirs.end)], "theirs", snapshot)
        store.record_landing(other, store.LedgerEntry(theirs, 1, 1, 0, 0, "theirs", 1))
        results, errors = [], []

        def land():
            try:
                results.append(land_range(mine, conn=conn, consumer=consumer, run_id="mine"))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        landing = threading.Thread(target=land)
        landing.start()
        try:
            with psycopg.connect(postgres_dsn, autocommit=True) as watcher:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    waiting = watcher.execute(
                        "select wait_event from pg_stat_activity where pid = %s",
                        (conn.info.backend_pid,),
                    ).fetchone()
                    if waiting and waiting[0] == "advisory":
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail("the landing did not wait to settle behind the other one")
            other.commit()
        finally:
            other.close()
            landing.join(60)
        assert not errors and results and results[0].rows_landed == mine.size
        outcomes = conn.execute(
            "select outcome, count(*) from audit.ingest_log where topic = %s"
            " and kafka_partition = %s group by 1",
            (topic, mine.partition),
        ).fetchall()
        ours = conn.execute(
            "select outcome from audit.ingest_log where topic = %s and kafka_partition = %s"
            " and kafka_offset = %s",
            (topic, mine.partition, first.offset()),
        ).fetchall()
    assert ours == [("duplicate",)]
    # one audit row per record: the first attempt's rows went with its transaction
    assert dict(outcomes) == {"landed": mine.size - 1, "duplicate": 1}


def test_a_span_read_to_its_end_keeps_the_assignment_and_any_span_reads_exactly_its_records(
    kafka_bootstrap, topic
):
    """The next range of a partition usually starts where the last one ended: the consumer stays
    assigned (librdkafka keeps what it fetched ahead) instead of starting over at each range.
    Spans elsewhere still read exactly their offsets; a span left early unassigns."""
    produce_orders(kafka_bootstrap, topic, 60, duplicate_rate=0, poison_rate=0)
    consumer = kafka_source.open_consumer(kafka_bootstrap, GROUP)
    try:
        marks = kafka_source.watermarks(consumer, topic, [0, 1, 2, 3])
        partition = max(marks, key=lambda p: marks[p][1])
        assert marks[partition][1] >= 30

        def read(start, end):
            spans = kafka_source.read_span(consumer, topic, partition, start, end, idle_timeout=10)
            return [m.offset() for batch in spans for m in batch]

        def assigned():
            return [(tp.topic, tp.partition) for tp in consumer.assignment()]

        assert read(0, 10) == list(range(10))
        assert assigned() == [(topic, partition)]
        (position,) = consumer.position([kafka_source.TopicPartition(topic, partition)])
        assert position.offset == 10  # where the next range starts: nothing to seek
        assert read(10, 20) == list(range(10, 20))
        assert read(25, 30) == list(range(25, 30))  # ahead
        assert read(3, 6) == [3, 4, 5]  # and back
        assert assigned() == [(topic, partition)]

        spans = kafka_source.read_span(consumer, topic, partition, 0, 30, idle_timeout=10)
        next(spans)
        spans.close()  # left early
        assert assigned() == []
        assert read(0, 3) == [0, 1, 2]
    finally:
        consumer.close()
