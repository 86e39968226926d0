"""`orderflow ack-loss`: which offsets a known loss covers (pure), and recording it against the
real broker and Postgres: only offsets Kafka no longer has, the rest of the range still lands."""

from __future__ import annotations

import argparse
import shlex
import time

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient
from hypothesis import given
from hypothesis import strategies as st

from orderflow_dagster.ingest.errors import OffsetsLostError
from orderflow_dagster.land import kafka_source, store
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.land.ranges import Coverage, OffsetRange, merge_intervals
from orderflow_dagster.serve.ack_loss import AckRefusedError, acknowledge, losses, parse_spec
from orderflow_dagster.serve.verify import loss_checks, storage_checks
from tests.support import invariants, produce_orders
from tests.test_catch_up import cli
from tests.test_landing import connections

TOPIC = "t"


@st.composite
def partition_history(draw: st.DrawFn):
    """Planned ranges of one partition (contiguous from an origin), the ledger spans that cover
    some of them (whole ranges, or pieces of them), Kafka's log start now, and an optional end."""
    origin = draw(st.integers(0, 50))
    sizes = draw(st.lists(st.integers(1, 20), max_size=6))
    planned, cursor = [], origin
    for size in sizes:
        planned.append(OffsetRange(TOPIC, 0, cursor, cursor + size))
        cursor += size
    landed = []
    for r in planned:
        kind = draw(st.sampled_from(["no", "whole", "piece"]))
        if kind == "whole":
            landed.append((r.start, r.end))
        elif kind == "piece" and r.size > 1:
            cut = draw(st.integers(r.start + 1, r.end - 1))
            landed.append(draw(st.sampled_from([(r.start, cut), (cut, r.end)])))
    # ledger rows past the plan: earlier acknowledgements of offsets never planned
    if draw(st.booleans()):
        extra = draw(st.integers(1, 10))
        landed.append((cursor, cursor + extra))
        cursor += extra
    log_start = draw(st.integers(0, cursor + 30))
    until = draw(st.none() | st.integers(0, cursor + 40))
    return planned, landed, log_start, until


def offsets(spans) -> set[int]:
    return {o for s, e in spans for o in range(s, e)}


@given(partition_history())
def test_an_acknowledgement_covers_exactly_the_unlanded_offsets_kafka_no_longer_has(history):
    planned, landed, log_start, until = history
    starts = [r.start for r in planned] + [s for s, _ in landed]
    origin = min(starts) if starts else None
    bound = log_start if until is None else min(until, log_start)
    still_in_kafka = (
        set(range(max(origin, log_start), until)) - offsets(landed)
        if origin is not None and until is not None
        else set()
    )
    if still_in_kafka:
        with pytest.raises(AckRefusedError, match="still in Kafka"):
            losses(TOPIC, 0, planned, landed, log_start, until)
        return
    found = losses(TOPIC, 0, planned, landed, log_start, until)
    acked = [(x.start, x.end) for x in found]
    expected = set(range(origin, bound)) - offsets(landed) if origin is not None else set()
    # exactly those offsets, each once
    assert offsets(acked) == expected
    assert sum(e - s for s, e in acked) == len(expected)
    for x in found:
        assert x.log_start == log_start and x.end <= log_start
        # within the planned range whose key the row carries, or one of its own past the plan
        assert x.range.start <= x.start < x.end <= x.range.end
        assert x.range in planned or (x.range.start, x.range.end) == (x.start, x.end)
        if x.range not in planned:
            assert not any(r.start < x.end and x.start < r.end for r in planned)
    # and afterwards the ledger is contiguous up to where Kafka's log starts (or `until`)
    if origin is not None and expected:
        merged = merge_intervals([*landed, *acked])
        assert any(s <= origin and bound <= e for s, e in merged)


@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 10)), max_size=8),
    st.integers(0, 70),
    st.integers(1, 10),
)
def test_coverage_answers_as_the_union_of_its_spans_does(spans, start, size):
    intervals = [(s, s + n) for s, n in spans]
    assert Coverage(intervals).covers(start, start + size) == (
        set(range(start, start + size)) <= offsets(intervals)
    )


def test_a_range_covered_by_an_acknowledgement_and_a_landing_is_landed():
    r = OffsetRange(TOPIC, 0, 10, 20)
    progress = store.TopicProgress({0: [r]}, {0: [(10, 14)]})
    assert progress.unlanded() == [r]
    progress = store.TopicProgress({0: [r]}, {0: [(10, 14), (14, 20)]})
    assert progress.unlanded() == []


def test_specs_name_a_partition_and_optionally_an_end():
    assert parse_spec("3") == (3, None)
    assert parse_spec("3:120") == (3, 120)
    for bad in ["x", "1:y", "-1", "1:-5", ""]:
        with pytest.raises(argparse.ArgumentTypeError, match=r"PARTITION|negative"):
            parse_spec(bad)


def delete_records(bootstrap: str, topic: str, partition: int, before: int) -> None:
    """What retention does: the log of `partition` now starts at `before`."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_records([TopicPartition(topic, partition, before)]).values():
        future.result(timeout=30)


def test_acknowledged_offsets_let_the_rest_of_their_range_land_and_verify_lists_them(
    kafka_bootstrap, postgres_dsn, topic
):
    produced = produce_orders(kafka_bootstrap, topic, 60)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.size > 6)
        delete_records(kafka_bootstrap, topic, victim.partition, victim.start + 4)
        with pytest.raises(OffsetsLostError):
            land_range(victim, conn=conn, consumer=consumer, run_id="fails")

        looked = acknowledge(
            conn, consumer, topic, {victim.partition: None}, "INC-1 retention", dry_run=True
        )
        assert [(x.start, x.end) for x in looked] == [(victim.start, victim.start + 4)]
        assert store.landed_spans(conn, topic, victim.partition) == []  # a dry run writes nothing

        found = acknowledge(conn, consumer, topic, {}, "INC-1 retention", dry_run=False)
        assert [(x.range, x.start, x.end) for x in found] == [
            (victim, victim.start, victim.start + 4)
        ]
        # the group moved past the acknowledged offsets at once
        assert kafka_source.committed(consumer, topic, [victim.partition]) == {
            victim.partition: victim.start + 4
        }
        # acknowledging again finds nothing: those offsets are covered now
        assert acknowledge(conn, consumer, topic, {}, "again", dry_run=False) == []

        rest = land_range(victim, conn=conn, consumer=consumer, run_id="rest")
        assert rest.messages_read == victim.size - 4
        assert store.landed_spans(conn, topic, victim.partition) == [
            (victim.start, victim.start + 4),
            (victim.start + 4, victim.end),
        ]
        assert store.topic_progress(conn, topic).unlanded(victim.partition) == []
        for r in plan.unlanded:
            if r != victim:
                land_range(r, conn=conn, consumer=consumer, run_id="others")
        audit = conn.execute(
            "select kafka_offset, reason, partition_key from audit.ingest_log"
            " where topic = %s and outcome = 'lost' order by 1",
            (topic,),
        ).fetchall()
        assert audit == [
            (o, "INC-1 retention", victim.key) for o in range(victim.start, victim.start + 4)
        ]
        inv = invariants(conn, consumer, topic, len(produced))
        assert inv.lost == 4 and inv.duplicated == 0 and inv.ledger_contiguous
        assert inv.committed == inv.ledger_ends
        checks = {c.name: c for c in storage_checks(conn, topic) + loss_checks(conn, topic)}
    assert all(c.ok for c in checks.values()), checks
    assert "4 offset(s) acknowledged as lost" in checks["no range lost records silently"].detail
    assert "INC-1 retention" in checks["no range lost records silently"].detail


def test_offsets_kafka_still_has_are_never_acknowledged(kafka_bootstrap, postgres_dsn, topic):
    produce_orders(kafka_bootstrap, topic, 40)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=10_000, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.size > 6)
        delete_records(kafka_bootstrap, topic, victim.partition, victim.start + 2)
        with pytest.raises(AckRefusedError, match=r"still in Kafka \(its log starts at"):
            acknowledge(
                conn, consumer, topic, {victim.partition: victim.start + 3}, "r", dry_run=False
            )
        with pytest.raises(AckRefusedError, match="no partition"):
            acknowledge(conn, consumer, topic, {99: None}, "r", dry_run=False)
        with pytest.raises(AckRefusedError, match="reason"):
            acknowledge(conn, consumer, topic, {}, "  ", dry_run=False)
        # nothing was recorded by any refusal
        assert store.landed_spans(conn, topic, victim.partition) == []
        lost = conn.execute(
            "select count(*) from audit.ingest_log where outcome = 'lost'"
        ).fetchone()[0]
        assert lost == 0
        # an end at the log start acknowledges just what Kafka deleted
        found = acknowledge(
            conn, consumer, topic, {victim.partition: victim.start + 2}, "r", dry_run=False
        )
    assert [(x.start, x.end) for x in found] == [(victim.start, victim.start + 2)]


@pytest.mark.faults
def test_an_offset_reset_override_during_retention_is_refused_and_the_loss_acknowledged(
    cli_env, topic, fault_report
):
    """Retention deletes the head of a planned range; an operator tries
    ORDERFLOW_KAFKA_CONFIG_AUTO_OFFSET_RESET=earliest to get past it. The override is refused,
    the landing fails loudly, `orderflow ack-loss` records exactly the deleted offsets, catch-up
    lands the rest and verify lists the acknowledged loss: nothing is lost silently."""
    env = cli_env(group=f"ack-loss-{topic}", max_events_per_batch=100)
    bootstrap, dsn = env["ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS"], env["ORDERFLOW_POSTGRES_DSN"]
    group = env["ORDERFLOW_CONSUMER_GROUP"]
    produced = produce_orders(bootstrap, topic, 60)
    cli("catch-up", "--no-dbt", env=env)
    produced += produce_orders(bootstrap, topic, 60, seed=2)
    with connections(bootstrap, dsn, group) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=100, max_inflight=1)
        victim = next(r for r in plan.unlanded if r.partition == 0)
    assert victim.size > 3
    deleted = list(range(victim.start, victim.start + 3))
    delete_records(bootstrap, topic, 0, victim.start + 3)

    overridden = cli(
        "catch-up",
        "--no-dbt",
        env={**env, "ORDERFLOW_KAFKA_CONFIG_AUTO_OFFSET_RESET": "earliest"},
        check=False,
    )
    stuck = cli("catch-up", "--no-dbt", env=env, check=False)
    started = time.monotonic()
    reason = "INC-7: retention outran the pipeline"
    looked = cli("ack-loss", "--reason", reason, env=env, check=False)
    confirm = shlex.split(looked.stdout.strip().splitlines()[-1]) if looked.stdout else []
    recorded = (
        cli(*confirm[1:], env=env, check=False)
        if confirm[:2] == ["orderflow", "ack-loss"]
        else None
    )
    caught_up = cli("catch-up", "--no-dbt", env=env, check=False)
    verified = cli("verify", env=env, check=False)
    with connections(bootstrap, dsn, group) as (conn, consumer):
        inv = invariants(conn, consumer, topic, len(produced))
        acknowledged = [
            o
            for (o,) in conn.execute(
                "select kafka_offset from audit.ingest_log where topic = %s"
                " and kafka_partition = 0 and outcome = 'lost' order by 1",
                (topic,),
            )
        ]
    fault_report.record(
        "15. consumer override with retention",
        messages=len(produced),
        # acknowledged offsets are a recorded loss, not a silent one
        lost=inv.lost - len(acknowledged),
        duplicated=inv.duplicated,
        recovery_s=time.monotonic() - started,
    )
    assert overridden.returncode == 2, overridden.stdout + overridden.stderr
    assert "ORDERFLOW_KAFKA_CONFIG_AUTO_OFFSET_RESET" in overridden.stderr
    assert "auto.offset.reset=error" in overridden.stderr
    assert stuck.returncode == 1 and "no longer in Kafka" in stuck.stdout + stuck.stderr
    assert looked.returncode == 0, looked.stdout + looked.stderr
    assert "would acknowledge 3 offset(s)" in looked.stdout
    assert "dry run: nothing recorded" in looked.stdout
    assert recorded is not None and recorded.returncode == 0, looked.stdout
    assert "acknowledged 3 offset(s)" in recorded.stdout
    assert caught_up.returncode == 0, caught_up.stdout + caught_up.stderr
    assert "lag:          0" in caught_up.stdout
    assert verified.returncode == 0, verified.stdout
    assert "ok    no range lost records silently" in verified.stdout
    assert f"3 offset(s) acknowledged as lost: p0 [{victim.start}, {victim.start + 3})" in (
        verified.stdout
    )
    assert reason in verified.stdout
    assert acknowledged == deleted
    assert inv.lost == len(deleted) and inv.duplicated == 0
    assert inv.ledger_contiguous and inv.committed == inv.ledger_ends
    assert inv.audit_mismatches == 0 and inv.landed_twice == 0
