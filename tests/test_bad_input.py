"""Bad input through the real broker and Postgres: every reason code, hostile payloads, replay,
the audit log and trace ids."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land.landing import land_range
from orderflow_dagster.land.parse import Reason
from orderflow_dagster.land.planner import plan_ranges
from orderflow_dagster.serve.dlq import replay
from orderflow_dagster.transform.dbt import run_dbt_build
from tests.support import invariants
from tests.test_landing import connections, land_all

MAX_BYTES = 200_000  # small, so that 'oversize' and a near-limit event fit in a quick test


def envelope(**overrides) -> dict:
    env = {
        "event_id": str(uuid.uuid4()),
        "aggregate_id": f"ord-{uuid.uuid4().hex[:8]}",
        "event_type": "OrderCancelled",
        "payload": {"reason": "changed my mind"},
        "timestamp": 1_735_689_600_000,
        "schema_version": 1,
    }
    env.update(overrides)
    return env


def raw(env: dict) -> bytes:
    return json.dumps(env).encode()


POISON: dict[str, bytes] = {
    Reason.INVALID_JSON: b'{"event_id": ',
    Reason.NOT_AN_OBJECT: b'["OrderCreated"]',
    Reason.MISSING_FIELD: raw({k: v for k, v in envelope().items() if k != "aggregate_id"}),
    Reason.INVALID_FIELD: raw(envelope(timestamp="2025-01-01")),
    Reason.INVALID_EVENT_ID: raw(envelope(event_id="12345")),
    Reason.UNKNOWN_EVENT_TYPE: raw(envelope(event_type="OrderTeleported")),
    Reason.UNSUPPORTED_SCHEMA_VERSION: raw(envelope(schema_version=3)),
    Reason.PAYLOAD_SCHEMA_VIOLATION: raw(envelope(payload={"reason": 42})),
    Reason.UNSTORABLE_VALUE: raw(envelope(payload={"reason": "nul \u0000 inside"})),
    Reason.OVERSIZE: raw(envelope(payload={"reason": "x" * (MAX_BYTES + 10)})),
}

HOSTILE_BUT_VALID: dict[str, bytes] = {
    "sql": raw(
        envelope(
            payload={"reason": "'); drop table raw.order_events; --"},
            aggregate_id="ord-'; delete from raw.ingest_ledger; --",
        )
    ),
    "tabs_newlines_backslashes": raw(
        envelope(payload={"reason": "a\tb\nc\\d\r"}, aggregate_id="ord\\\t\n")
    ),
    "ten_thousand_items": raw(envelope(payload={"reason": "bulk", "items": list(range(10_000))})),
    "huge_integer": raw(envelope(payload={"reason": "r", "n": 10**40})),
    "duplicate_keys": raw(envelope())[:-1] + b', "schema_version": 1}',
    "near_the_limit": raw(envelope(payload={"reason": "y" * (MAX_BYTES - 400)})),
    "unicode": raw(envelope(payload={"reason": "注文 取消 🚫 \u2028"})),
    # newlines and tabs between the tokens: the fast path keeps the payload's bytes as sent
    "pretty_printed": json.dumps(envelope(payload={"reason": "a\tb"}), indent="\t").encode(),
}
INVALID_UTF8 = b'{"event_id": "\xff\xfe"}'


@pytest.fixture(scope="module")
def landed(request, kafka_bootstrap, stack_dsn):
    """One topic and database holding every poison kind and every hostile-but-valid event."""
    topic = f"orders.events.bad-{uuid.uuid4().hex[:8]}"
    from orderflow_dagster.stack import manager

    manager.ensure_topics(kafka_bootstrap, {topic: 1})
    db = f"bad_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(stack_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(db)))
    dsn = psycopg.conninfo.make_conninfo(stack_dsn, dbname=db)
    messages = [*POISON.values(), *HOSTILE_BUT_VALID.values(), INVALID_UTF8]
    with EventProducer(kafka_bootstrap, topic=topic, extra={"message.max.bytes": 2_000_000}) as p:
        for value in messages:
            p.produce_raw(value, b"bad-input")
    with connections(kafka_bootstrap, dsn) as (conn, consumer):
        plan = plan_ranges(conn, consumer, topic, max_events_per_batch=1000, max_inflight=1)
        for r in plan.unlanded:
            land_range(
                r, conn=conn, consumer=consumer, run_id="bad-input", max_message_bytes=MAX_BYTES
            )
    yield {"topic": topic, "dsn": dsn, "bootstrap": kafka_bootstrap, "produced": len(messages)}
    with psycopg.connect(stack_dsn, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("drop database {} with (force)").format(psycopg.sql.Identifier(db))
        )


def dead_letter(landed, offset: int):
    with psycopg.connect(landed["dsn"]) as conn:
        return conn.execute(
            "select reason, detail, value from raw.dead_letters where topic = %s"
            " and kafka_offset = %s",
            (landed["topic"], offset),
        ).fetchone()


@pytest.mark.parametrize("reason", list(POISON))
def test_each_reason_code_is_dead_lettered_through_kafka_and_postgres(landed, reason):
    offset = list(POISON).index(reason)
    got_reason, detail, value = dead_letter(landed, offset)
    assert got_reason == reason
    assert detail
    assert bytes(value) == POISON[reason]


def test_invalid_utf8_survives_byte_for_byte_in_the_dead_letter(landed):
    reason, _, value = dead_letter(landed, landed["produced"] - 1)
    assert reason == Reason.INVALID_JSON and bytes(value) == INVALID_UTF8


@pytest.mark.parametrize("name", list(HOSTILE_BUT_VALID))
def test_hostile_but_valid_events_land_literally(landed, name):
    offset = len(POISON) + list(HOSTILE_BUT_VALID).index(name)
    sent = json.loads(HOSTILE_BUT_VALID[name])
    with psycopg.connect(landed["dsn"]) as conn:
        row = conn.execute(
            "select aggregate_id, payload::text from raw.order_events where topic = %s"
            " and kafka_offset = %s",
            (landed["topic"], offset),
        ).fetchone()
    assert row is not None, f"{name} was not landed"
    assert row[0] == sent["aggregate_id"]
    assert json.loads(row[1]) == sent["payload"]  # exact, big integers included


def test_nothing_is_lost_and_every_record_is_in_the_audit_log(landed):
    with connections(landed["bootstrap"], landed["dsn"]) as (conn, consumer):
        inv = invariants(conn, consumer, landed["topic"], landed["produced"])
        assert inv.raw_rows + inv.dead_letters == landed["produced"]
        outcomes = dict(
            conn.execute(
                "select outcome, count(*) from audit.ingest_log where topic = %s group by 1",
                (landed["topic"],),
            ).fetchall()
        )
    assert outcomes == {"landed": inv.raw_rows, "dead_lettered": inv.dead_letters}


def test_the_audit_log_refuses_updates_and_deletes(landed):
    with psycopg.connect(landed["dsn"], autocommit=True) as conn:
        for statement in (
            "update audit.ingest_log set outcome = 'landed'",
            "delete from audit.ingest_log",
            "truncate audit.ingest_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("select count(*) from audit.ingest_log").fetchone()[0] > 0


def test_replaying_a_fixed_dead_letter_twice_lands_it_once(landed):
    offset = list(POISON).index(Reason.OVERSIZE)
    coords = (landed["topic"], 0, offset)
    with psycopg.connect(landed["dsn"], autocommit=True) as conn:
        # the fix: the limit is raised above the record's size
        first = replay(
            conn, topic=landed["topic"], coordinates=[coords], max_message_bytes=10 * MAX_BYTES
        )
        second = replay(
            conn, topic=landed["topic"], coordinates=[coords], max_message_bytes=10 * MAX_BYTES
        )
        still = replay(conn, topic=landed["topic"], reason=Reason.UNKNOWN_EVENT_TYPE)
        rows = conn.execute(
            "select count(*) from raw.order_events where topic = %s and kafka_offset = %s",
            (landed["topic"], offset),
        ).fetchone()[0]
        replayed_at, audit = conn.execute(
            "select (select replayed_at from raw.dead_letters where topic = %s and"
            " kafka_offset = %s), (select count(*) from audit.ingest_log where topic = %s and"
            " kafka_offset = %s and outcome = 'replayed')",
            (landed["topic"], offset, landed["topic"], offset),
        ).fetchone()
    assert first.replayed == [coords] and second.replayed == []
    assert rows == 1 and replayed_at is not None and audit == 1
    # a dead letter that still fails validation stays a dead letter
    assert still.replayed == [] and still.still_invalid[0][1] == Reason.UNKNOWN_EVENT_TYPE


def test_a_traceparent_header_travels_from_the_producer_to_order_status(
    kafka_bootstrap, postgres_dsn, topic, monkeypatch
):
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", "analytics")
    trace_id = uuid.uuid4().hex
    env = envelope(
        event_type="OrderCreated",
        schema_version=2,
        payload={
            "customer_id": "cust-0001",
            "order_total": 1.5,
            "currency": "EUR",
            "items": [{"sku": "SKU-0001", "qty": 1, "unit_price": 1.5}],
            "channel": "web",
        },
    )
    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        producer.emit(env, headers=[("traceparent", f"00-{trace_id}-{'1' * 16}-01".encode())])
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_all(conn, consumer, topic)
        raw_trace, audit_trace = conn.execute(
            "select (select trace_id from raw.order_events where event_id = %s),"
            " (select trace_id from audit.ingest_log where event_id = %s)",
            (env["event_id"], env["event_id"]),
        ).fetchone()
    assert "trace_id" not in env  # the envelope carried none: it came from the header
    assert raw_trace == audit_trace == trace_id
    run_dbt_build(postgres_dsn)
    with psycopg.connect(postgres_dsn) as conn:
        (view_trace,) = conn.execute(
            "select last_trace_id from analytics.order_status where order_id = %s",
            (env["aggregate_id"],),
        ).fetchone()
    assert view_trace == trace_id


def test_the_dead_letter_rate_check_warns_on_a_poison_heavy_range(landed, tmp_path):
    from dagster import AssetCheckSeverity, DagsterInstance, materialize

    from orderflow_dagster.defs.assets import offset_ranges, raw_order_events
    from orderflow_dagster.defs.resources import KafkaResource, LandingSettings, PostgresResource
    from orderflow_dagster.land.ranges import OffsetRange

    # re-materializing the already-landed range reports the rate of what it read: land the
    # range again in a fresh database so the check sees every record
    rng = OffsetRange(landed["topic"], 0, 0, landed["produced"])
    with psycopg.connect(landed["dsn"], autocommit=True) as conn:
        db = f"check_{uuid.uuid4().hex[:8]}"
        conn.execute(psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(db)))
    dsn = psycopg.conninfo.make_conninfo(landed["dsn"], dbname=db)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(offset_ranges.name, [rng.key])
        result = materialize(
            [raw_order_events],
            partition_key=rng.key,
            instance=instance,
            resources={
                "kafka": KafkaResource(
                    bootstrap_servers=landed["bootstrap"],
                    topic=landed["topic"],
                    consumer_group="check-test",
                ),
                "postgres": PostgresResource(dsn=dsn),
                "landing": LandingSettings(max_message_bytes=MAX_BYTES, max_dead_letter_share=0.05),
            },
        )
    assert result.success  # poison never fails the batch
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"dead_letter_rate", "kafka_lag"}
    evaluation = evaluations["dead_letter_rate"]
    assert evaluation.passed is False and evaluation.severity == AssetCheckSeverity.WARN
    assert evaluation.metadata["dead_letters"].value == len(POISON) + 1
    materialization = result.asset_materializations_for_node("raw_order_events")[0]
    assert materialization.metadata["rows_landed"].value == len(HOSTILE_BUT_VALID)


def test_the_dlq_command_lists_shows_and_replays(landed):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "ORDERFLOW_POSTGRES_DSN": landed["dsn"],
        "ORDERFLOW_TOPIC": landed["topic"],
    }
    orderflow = str(Path(sys.executable).parent / "orderflow")

    def run(*args):
        return subprocess.run(
            [orderflow, "dlq", *args], env=env, capture_output=True, text=True, timeout=60
        )

    listed = run("list")
    assert listed.returncode == 0
    assert "unknown_event_type" in listed.stdout and "oversize" in listed.stdout
    offset = list(POISON).index(Reason.NOT_AN_OBJECT)
    shown = run("show", f"{landed['topic']}:0:{offset}")
    assert shown.returncode == 0 and "not_an_object" in shown.stdout
    assert repr(POISON[Reason.NOT_AN_OBJECT]) in shown.stdout
    replayed = run("replay", "--reason", Reason.NOT_AN_OBJECT)
    assert replayed.returncode == 0
    assert "replayed 0; still invalid 1" in replayed.stdout
