"""Ledger watermarks (raw.ingest_watermarks): planning, landing and the commit repair read a
partition's watermark and the plan and ledger rows above it, never the whole history, and get
the answers the whole history gives. Against the real broker and Postgres."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderflow_dagster.defs.launch import raw_marker
from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.land import incarnations, store
from orderflow_dagster.land.landing import land_range, repair_kafka_commits
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import OffsetRange, contiguous_end, merge_intervals, uncovered
from orderflow_dagster.serve.ack_loss import losses
from tests.support import produce, scratch_database
from tests.test_landing import connections

PREVIOUS_SCHEMA = Path(__file__).parent / "fixtures" / "schema-0aa65f3.sql"
PARTITIONS = 4


def ledger_row(conn, topic: str, partition: int, start: int, end: int, reason=None) -> None:
    """A ledger row as the landing (or, with a reason, ack-loss) writes it."""
    rng = OffsetRange(topic, partition, start, end)
    store.record_landing(
        conn,
        store.LedgerEntry(rng, end - start, end - start, 0, 0, "t", 0, acknowledged_loss=reason),
    )


def assert_same_progress(conn, topic: str) -> None:
    """What the watermark and the rows above it say equals what the whole plan and ledger say:
    the planner's frontier and unlanded ranges, the landing's coverage, the commit target, the
    loss counts of a retired stream and of ack-loss."""
    full = store.topic_progress(conn, topic)
    above = store.progress_above_watermark(conn, topic)
    assert above.partitions() == full.partitions()
    assert above.unlanded() == full.unlanded()
    for p in full.partitions():
        spans = full.landed.get(p, [])
        assert above.frontier(p) == full.frontier(p)
        assert above.origin(p) == full.origin(p)
        assert merge_intervals(above.landed.get(p, [])) == merge_intervals(spans)
        assert merge_intervals(store.spans_above_watermark(conn, topic, p)) == merge_intervals(
            spans
        )
        mark = store.watermark(conn, topic, p)
        assert mark == store.Watermark(full.origin(p), contiguous_end(full.origin(p), spans))
        # the landing's gaps for every planned range
        for r in full.planned.get(p, []):
            assert uncovered(r.start, r.end, store.spans_above_watermark(conn, topic, p)) == (
                uncovered(r.start, r.end, spans)
            )
        # ack-loss with everything unlanded gone from Kafka
        log_start = full.frontier(p)
        assert losses(
            topic,
            p,
            above.planned.get(p, []),
            store.spans_above_watermark(conn, topic, p),
            log_start,
        ) == losses(topic, p, full.planned.get(p, []), spans, log_start)
    assert incarnations.lost_spans(topic, above.planned, above.landed, {}) == (
        incarnations.lost_spans(topic, full.planned, full.landed, {})
    )
    counted = dict(
        conn.execute(
            "select kafka_partition, count(*) from raw.ingest_ledger where topic = %s group by 1",
            (topic,),
        ).fetchall()
    )
    kept = dict(
        conn.execute(
            "select kafka_partition, ledger_rows from raw.ingest_watermarks where topic = %s"
            " and ledger_rows > 0",
            (topic,),
        ).fetchall()
    )
    assert kept == counted


STEPS = ["plan", "land", "acknowledge_part", "acknowledge_past_plan", "delete", "below_origin"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_progress_from_the_watermark_equals_progress_from_the_whole_history(postgres_dsn, data):
    """Arbitrary sequences of planning, landings in any order (whole ranges, or the gaps a
    partial coverage leaves), acknowledged losses of parts of ranges and of offsets past the
    plan, rows deleted by hand and ranges landed below the origin: after each step the bounded
    reads give the whole history's answers."""
    topic = f"wm-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        store.ensure_schema(conn)
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            full = store.topic_progress(conn, topic)
            step = data.draw(st.sampled_from(STEPS), label="step")
            p = data.draw(st.integers(0, 1), label="partition")
            frontier = full.frontier(p)
            if step == "plan" or frontier is None:
                start = frontier if frontier is not None else data.draw(st.integers(0, 20))
                sizes = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
                ranges = []
                for size in sizes:
                    ranges.append(OffsetRange(topic, p, start, start + size))
                    start += size
                store.record_plan(conn, ranges)
                continue
            spans = full.landed.get(p, [])
            open_ranges = [
                (r, gaps)
                for r in full.planned.get(p, [])
                if (gaps := uncovered(r.start, r.end, spans))
            ]
            if step == "land" and open_ranges:
                _, gaps = data.draw(st.sampled_from(open_ranges))
                for s, e in gaps:  # one row per gap, as the landing writes them
                    ledger_row(conn, topic, p, s, e)
            elif step == "acknowledge_part" and open_ranges:
                _, gaps = data.draw(st.sampled_from(open_ranges))
                s, e = gaps[0]
                ledger_row(conn, topic, p, s, data.draw(st.integers(s + 1, e)), "lost")
            elif step == "acknowledge_past_plan":
                ledger_row(conn, topic, p, frontier, frontier + data.draw(st.integers(1, 5)), "x")
            elif step == "delete" and spans:
                s, e = data.draw(st.sampled_from(spans))
                conn.execute(
                    "delete from raw.ingest_ledger where topic = %s and kafka_partition = %s"
                    " and start_offset = %s and end_offset = %s",
                    (topic, p, s, e),
                )
            elif step == "below_origin" and full.origin(p) > 0:
                origin = full.origin(p)
                ledger_row(conn, topic, p, data.draw(st.integers(0, origin - 1)), origin)
            assert_same_progress(conn, topic)
        assert_same_progress(conn, topic)


def test_a_database_whose_history_predates_the_watermarks_gets_them_on_upgrade(postgres_dsn):
    """The previous release's schema with plans and ledgers of several shapes (landed in order,
    out of order above a gap, a partition only planned): the upgrade computes each watermark from
    the whole history, and the triggers keep it from then on."""
    with scratch_database(postgres_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(PREVIOUS_SCHEMA.read_text())
        shapes = {
            ("old.events", 0): ([(0, 10), (10, 20), (20, 30)], [(0, 10), (10, 20), (20, 30)]),
            ("old.events", 1): ([(5, 10), (10, 15), (15, 20)], [(5, 10), (15, 20)]),
            ("old.events", 2): ([(7, 9)], []),
            ("other.events", 0): ([(0, 4), (4, 8)], [(4, 8)]),
        }
        for (topic, p), (planned, landed) in shapes.items():
            for s, e in planned:
                conn.execute(
                    "insert into raw.ingest_plan (topic, kafka_partition, start_offset,"
                    " end_offset, partition_key) values (%s, %s, %s, %s, %s)",
                    (topic, p, s, e, OffsetRange(topic, p, s, e).key),
                )
            for s, e in landed:
                conn.execute(
                    "insert into raw.ingest_ledger (topic, kafka_partition, start_offset,"
                    " end_offset, partition_key, messages_read, rows_landed, dead_letters,"
                    " already_landed, run_id) values (%s, %s, %s, %s, %s, 0, 0, 0, 0, 'old')",
                    (topic, p, s, e, OffsetRange(topic, p, s, e).key),
                )
        store.ensure_schema(conn)
        marks = {
            (t, p): (o, w, n)
            for t, p, o, w, n in conn.execute("select * from raw.ingest_watermarks")
        }
        assert marks == {
            ("old.events", 0): (0, 30, 3),
            ("old.events", 1): (5, 10, 2),
            ("old.events", 2): (7, 7, 0),
            ("other.events", 0): (0, 0, 1),
        }
        for topic in ("old.events", "other.events"):
            assert_same_progress(conn, topic)
        # and after the upgrade, a landing into the gap moves the prefix over the row above it
        ledger_row(conn, "old.events", 1, 10, 15)
        assert store.watermark(conn, "old.events", 1) == store.Watermark(5, 20)
        assert_same_progress(conn, "old.events")


def test_watermarks_follow_rows_moved_or_truncated_by_hand(postgres_dsn):
    """orderflow never moves or truncates plan or ledger rows; if someone does, each watermark is
    computed again from what is left, so no read above it misses a row."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        store.ensure_schema(conn)
        store.record_plan(conn, [OffsetRange("a", 0, 0, 5), OffsetRange("a", 0, 5, 9)])
        ledger_row(conn, "a", 0, 0, 5)
        ledger_row(conn, "a", 0, 5, 9)
        ledger_row(conn, "b", 1, 3, 4)
        assert store.watermark(conn, "a", 0) == store.Watermark(0, 9)
        conn.execute(
            "update raw.ingest_ledger set topic = 'b', kafka_partition = 1"
            " where topic = 'a' and start_offset = 5"
        )
        assert store.watermark(conn, "a", 0) == store.Watermark(0, 5)
        assert store.watermark(conn, "b", 1) == store.Watermark(3, 4)
        for topic in ("a", "b"):
            assert_same_progress(conn, topic)
        conn.execute("truncate raw.ingest_ledger")
        assert store.watermark(conn, "a", 0) == store.Watermark(0, 0)
        assert store.watermark(conn, "b", 1) is None  # nothing planned or landed there now
        assert_same_progress(conn, "a")


def test_the_dbt_marker_counts_every_commit_whatever_order_the_transactions_began_in(
    postgres_dsn,
):
    """The marker changes with each landing and each replay that landed rows, also when a
    landing that began first commits last (its xid and landed_at are below the latest), and its
    counts are the ledger's and the replay log's own."""
    with (
        psycopg.connect(postgres_dsn, autocommit=True) as conn,
        psycopg.connect(postgres_dsn) as first,
        psycopg.connect(postgres_dsn) as second,
    ):
        store.ensure_schema(conn)

        def marker() -> str:
            c = store.raw_marker_counts(conn)
            return raw_marker(c.ledger_rows, c.last_landed_at, c.replays, c.last_replayed_at)

        empty = marker()
        # the first landing takes its xid and its landed_at first, and commits last
        first.execute("select pg_current_xact_id()")
        ledger_row(first, "t", 0, 0, 5)
        ledger_row(second, "t", 1, 0, 5)
        second.commit()
        after_second = marker()
        first.commit()
        after_both = marker()
        assert len({empty, after_second, after_both}) == 3
        conn.execute(
            "insert into raw.replay_log (topic, run_id, rows_replayed, still_invalid)"
            " values ('t', 'r1', 0, 2)"
        )
        assert marker() == after_both  # a replay that landed nothing changes nothing
        conn.execute(
            "insert into raw.replay_log (topic, run_id, rows_replayed, still_invalid)"
            " values ('t', 'r2', 3, 0), ('u', 'r3', 1, 0)"
        )
        assert marker() != after_both
        counts = store.raw_marker_counts(conn)
        truth = conn.execute(
            "select (select count(*) from raw.ingest_ledger),"
            " (select max(landed_at) from raw.ingest_ledger),"
            " count(*), max(replayed_at) from raw.replay_log where rows_replayed > 0"
        ).fetchone()
        assert (
            counts.ledger_rows,
            counts.last_landed_at,
            counts.replays,
            counts.last_replayed_at,
        ) == truth
        # replays recorded before the totals existed are counted once, by the upgrade
        conn.execute("delete from raw.replay_totals")
        conn.execute("delete from raw.schema_applied")
        store.ensure_schema(conn)
        assert store.raw_marker_counts(conn) == counts


# -- what a tick, a landing and a repair read, early and after a long history ---------------------

BATCH = 2
TABLES = ("ingest_plan", "ingest_ledger")


def read_counters(conn) -> dict[str, int]:
    """Rows read so far from the plan and the ledger: by sequential scans, and per index (index
    entries returned), as the statistics collector counts them. The own backend's pending
    counts are flushed first."""
    conn.execute("select pg_stat_force_next_flush()")
    out: dict[str, int] = {}
    for name, seq_scans, seq_rows in conn.execute(
        "select relname, seq_scan, seq_tup_read from pg_stat_user_tables"
        " where schemaname = 'raw' and relname = any(%s)",
        (list(TABLES),),
    ):
        out[f"{name} seq scans"] = seq_scans
        out[f"{name} seq rows"] = seq_rows
    for name, rows in conn.execute(
        "select indexrelname, idx_tup_read from pg_stat_user_indexes"
        " where schemaname = 'raw' and relname = any(%s)",
        (list(TABLES),),
    ):
        out[name] = rows
    return out


def reads(conn, action):
    """(what `action` returned, the plan and ledger rows it read)."""
    before = read_counters(conn)
    result = action()
    after = read_counters(conn)
    # the xact_id index is read by audit.settle_landing for the landings of other partitions
    # that committed meanwhile: bounded by concurrency, not by history, and not asked about here
    return result, {k: after[k] - before.get(k, 0) for k in after if k != "ingest_ledger_xact_id"}


def produce_to_each_partition(bootstrap: str, topic: str, count: int, seed: int) -> None:
    """`count` clean events on every partition, so both measurements see the same shape."""
    outgoing = generate(count * PARTITIONS, seed=seed, duplicate_rate=0, poison_rate=0)
    messages = list(itertools.islice(outgoing, count * PARTITIONS))
    produce(
        bootstrap,
        topic,
        [replace(m, partition=i // count) for i, m in enumerate(messages)],
    )


def land_everything(conn, consumer, topic: str) -> int:
    plan = plan_ranges(conn, consumer, topic, max_events_per_batch=BATCH, max_inflight=100_000)
    for r in plan.unlanded:
        land_range(r, conn=conn, consumer=consumer, run_id="history")
    repair_kafka_commits(conn, consumer, topic)
    return len(plan.unlanded)


def rows_above(conn, topic: str) -> tuple[int, int]:
    """Plan and ledger rows ending past their partition's watermark, counted the long way."""
    return conn.execute(
        "select (select count(*) from raw.ingest_plan p join raw.ingest_watermarks w"
        " using (topic, kafka_partition) where topic = %s and p.end_offset > w.landed_to),"
        " (select count(*) from raw.ingest_ledger l join raw.ingest_watermarks w"
        " using (topic, kafka_partition) where topic = %s and l.end_offset > w.landed_to)",
        (topic, topic),
    ).fetchone()


def one_cycle(conn, consumer, topic: str, bootstrap: str, seed: int) -> dict:
    """New records on every partition; a tick plans them; a later range of partition 0 lands
    before the one below it; a tick; the lower one lands; a repair. What each step read, and
    what the planner, the landing and the repair answered."""

    def tick(max_inflight: int = 2):
        plan = plan_ranges(
            conn, consumer, topic, max_events_per_batch=BATCH, max_inflight=max_inflight
        )
        return plan, repair_kafka_commits(conn, consumer, topic, topic_id=plan.topic_id)

    produce_to_each_partition(bootstrap, topic, 2 * BATCH, seed)
    (plan, _), planning = reads(conn, tick)
    lower, upper = [r for r in plan.unlanded if r.partition == 0]
    _, out_of_order = reads(
        conn, lambda: land_range(upper, conn=conn, consumer=consumer, run_id="u")
    )
    plan_above, ledger_above = rows_above(conn, topic)
    (plan_again, _), steady = reads(conn, tick)
    # the answers are the whole history's: unlanded ranges, frontiers
    before = store.topic_progress(conn, topic)
    assert plan_again.unlanded == before.unlanded() and plan_again.new == []
    assert {p: s.frontier for p, s in plan_again.states.items()} == {
        p: before.frontier(p) for p in range(PARTITIONS)
    }
    _, in_order = reads(conn, lambda: land_range(lower, conn=conn, consumer=consumer, run_id="l"))
    committed, repair = reads(conn, lambda: repair_kafka_commits(conn, consumer, topic))
    counts, marker = reads(conn, lambda: store.raw_marker_counts(conn))
    full = store.topic_progress(conn, topic)
    assert counts.ledger_rows == sum(len(v) for v in full.landed.values())
    # and commits: the end of each partition's landed prefix
    assert committed == {
        p: contiguous_end(full.origin(p), full.landed.get(p, [])) for p in range(PARTITIONS)
    }
    assert_same_progress(conn, topic)
    # the steady tick read exactly the rows above the watermarks, through the end_offset index
    assert steady["ingest_plan_end"] == plan_above > 0
    assert steady["ingest_ledger_end"] == ledger_above > 0
    measured = {
        "planning tick": planning,
        "steady tick": steady,
        "landing above a gap": out_of_order,
        "landing into the gap": in_order,
        "repair": repair,
        "dbt marker": marker,
    }
    for what, counters in measured.items():
        for table in TABLES:
            assert counters[f"{table} seq scans"] == 0, (what, counters)
            # the primary key is only probed for conflicts by inserts, never scanned
            assert counters[f"{table}_pkey"] == 0, (what, counters)
    return measured


@pytest.mark.slow
def test_a_tick_a_landing_and_a_repair_read_the_same_rows_after_a_long_history(
    kafka_bootstrap, postgres_dsn, topic
):
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        for table in TABLES:  # no autovacuum or analyze reading the tables under the counters
            conn.execute(f"alter table raw.{table} set (autovacuum_enabled = false)")
        produce_to_each_partition(kafka_bootstrap, topic, 4 * BATCH, seed=1)
        early_history = land_everything(conn, consumer, topic)
        early = one_cycle(conn, consumer, topic, kafka_bootstrap, seed=2)
        land_everything(conn, consumer, topic)

        produce_to_each_partition(kafka_bootstrap, topic, 60 * BATCH, seed=3)
        late_history = land_everything(conn, consumer, topic)
        history = conn.execute("select count(*) from raw.ingest_ledger").fetchone()[0]
        late = one_cycle(conn, consumer, topic, kafka_bootstrap, seed=4)
    assert late_history > 10 * early_history and history > 250
    assert late == early
    rows_read = sum(v for counters in late.values() for v in counters.values())
    assert rows_read < 50 < history


# -- the planning sensor's Dagster lookups --------------------------------------------------------


def test_the_planning_sensor_asks_dagster_only_about_the_unlanded_ranges(
    kafka_bootstrap, postgres_dsn, topic, monkeypatch
):
    """The sensor never loads the definition's whole key set: it asks about each unlanded range
    and requests only those Dagster does not have yet."""
    from orderflow_dagster.defs.assets import offset_ranges
    from orderflow_dagster.defs.resources import KafkaResource, LandingSettings, PostgresResource
    from orderflow_dagster.defs.sensors import kafka_offset_ranges_sensor

    produce_to_each_partition(kafka_bootstrap, topic, 3, seed=5)
    instance = DagsterInstance.ephemeral()
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=3, max_inflight=10)
        landed, known, *_ = sorted(plan.unlanded)
        land_range(landed, conn=conn, consumer=consumer, run_id="landed")
    instance.add_dynamic_partitions(offset_ranges.name, [landed.key, known.key, "old|0|1-2"])
    asked: list[str] = []
    has = instance.has_dynamic_partition

    def has_dynamic_partition(name: str, key: str) -> bool:
        asked.append(key)
        return has(name, key)

    def everything(name: str):
        raise AssertionError("the sensor loaded every partition key")

    monkeypatch.setattr(instance, "has_dynamic_partition", has_dynamic_partition)
    monkeypatch.setattr(instance, "get_dynamic_partitions", everything)
    context = build_sensor_context(
        instance=instance,
        resources={
            "kafka": KafkaResource(
                bootstrap_servers=kafka_bootstrap, topic=topic, consumer_group="sensor-lookups"
            ),
            "postgres": PostgresResource(dsn=postgres_dsn),
            "landing": LandingSettings(max_events_per_batch=3, max_inflight=10),
        },
    )
    result = kafka_offset_ranges_sensor(context)
    unlanded = sorted(r.key for r in plan.unlanded if r != landed)
    assert isinstance(result, SensorResult)
    assert sorted(asked) == unlanded
    (added,) = result.dynamic_partitions_requests
    assert sorted(added.partition_keys) == [k for k in unlanded if k != known.key]
