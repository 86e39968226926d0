"""Helpers shared by the end-to-end tests: produce a stream, land it, check the invariants."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orderflow_dagster.ingest.generator import Outgoing, generate
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.land import kafka_source
from orderflow_dagster.land.ranges import merge_intervals
from orderflow_dagster.serve.verify import audit_counts


def orderflow(*args: str, env: dict[str, str], check: bool = True):
    """The CLI of this checkout, in a subprocess, as an operator runs it; with `check`, a
    non-zero exit fails the test with what the command printed."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "orderflow_dagster.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"orderflow {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def scratch_database(server_dsn: str) -> Iterator[str]:
    """A fresh, empty database on the server of `server_dsn`, dropped afterwards: the dbt marts
    read every topic of a database, so a test that builds them needs one of its own."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def produce(bootstrap: str, topic: str, outgoing: list[Outgoing]) -> None:
    with EventProducer(bootstrap, topic=topic) as producer:
        for msg in outgoing:
            producer.produce_raw(msg.value, msg.key, msg.partition)


def produce_orders(bootstrap: str, topic: str, orders: int, *, seed: int = 1, **rates) -> list:
    outgoing = list(generate(orders, seed=seed, num_partitions=4, **rates))
    produce(bootstrap, topic, outgoing)
    return outgoing


@dataclass
class Invariants:
    produced: int
    raw_rows: int
    dead_letters: int
    duplicate_coordinates: int
    ledger_contiguous: bool
    ledger_ends: dict[int, int]
    committed: dict[int, int | None]
    distinct_coordinates: int = 0  # records stored at least once, as a row or a dead letter
    # from `orderflow verify`'s audit counts: records off by their audit row, event_ids
    # audited as landed twice
    audit_mismatches: int = 0
    landed_twice: int = 0

    @property
    def lost(self) -> int:
        return max(0, self.produced - self.distinct_coordinates)

    @property
    def duplicated(self) -> int:
        return self.raw_rows + self.dead_letters - self.distinct_coordinates

    def assert_exactly_once(self) -> None:
        assert self.raw_rows + self.dead_letters == self.produced, self
        assert self.duplicate_coordinates == 0, self
        assert self.ledger_contiguous, self
        assert self.committed == self.ledger_ends, self
        assert self.audit_mismatches == 0 and self.landed_twice == 0, self


def invariants(conn: psycopg.Connection, consumer, topic: str, produced: int) -> Invariants:
    raw, dead = conn.execute(
        "select (select count(*) from raw.order_events where topic = %s),"
        " (select count(*) from raw.dead_letters where topic = %s)",
        (topic, topic),
    ).fetchone()
    dupes, distinct = conn.execute(
        "select count(*) filter (where n > 1), count(*) from (select count(*) as n from ("
        " select kafka_partition, kafka_offset from raw.order_events where topic = %s"
        " union all select kafka_partition, kafka_offset from raw.dead_letters where topic = %s"
        ") c group by kafka_partition, kafka_offset) d",
        (topic, topic),
    ).fetchone()
    spans: dict[int, list[tuple[int, int]]] = {}
    for p, s, e in conn.execute(
        "select kafka_partition, start_offset, end_offset from raw.ingest_ledger"
        " where topic = %s order by 1, 2",
        (topic,),
    ):
        spans.setdefault(p, []).append((s, e))
    contiguous = all(
        all(a[1] == b[0] for a, b in itertools.pairwise(v)) and len(merge_intervals(v)) == 1
        for v in spans.values()
    )
    parts = kafka_source.partitions(consumer, topic)
    committed = kafka_source.committed(consumer, topic, parts)
    ends = {p: (spans[p][-1][1] if p in spans else None) for p in parts}
    rows_off, dead_off, landed_twice = audit_counts(conn, topic)
    return Invariants(
        produced,
        raw,
        dead,
        dupes,
        contiguous,
        ends,
        committed,
        distinct,
        audit_mismatches=rows_off + dead_off,
        landed_twice=landed_twice,
    )


def mart_duplicates(conn: psycopg.Connection, schema: str = "analytics") -> int:
    """Rows beyond one per event_id in the marts keyed by event (the dedup dbt promises)."""
    return sum(
        conn.execute(
            sql.SQL("select count(*) - count(distinct event_id) from {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
        ).fetchone()[0]
        for table in ("order_events", "order_status_history")
    )


def table_checksums(conn: psycopg.Connection, topic: str) -> dict[str, tuple]:
    """Content checksums of the landed tables (without landed_at/run_id: when, not what)."""
    return {
        "order_events": conn.execute(
            "select count(*), md5(string_agg(concat_ws('|', kafka_partition, kafka_offset,"
            " event_id, aggregate_id, event_type, schema_version, event_ts_ms, payload::text,"
            " key, headers::text, trace_id), ',' order by kafka_partition, kafka_offset))"
            " from raw.order_events where topic = %s",
            (topic,),
        ).fetchone(),
        "dead_letters": conn.execute(
            "select count(*), md5(string_agg(concat_ws('|', kafka_partition, kafka_offset,"
            " encode(value, 'hex'), reason, detail), ',' order by kafka_partition, kafka_offset))"
            " from raw.dead_letters where topic = %s",
            (topic,),
        ).fetchone(),
        "ledger": conn.execute(
            "select count(*), md5(string_agg(concat_ws('|', kafka_partition, start_offset,"
            " end_offset, rows_landed, dead_letters), ',' order by kafka_partition, start_offset))"
            " from raw.ingest_ledger where topic = %s",
            (topic,),
        ).fetchone(),
    }


def kinds(outgoing: list[Outgoing]) -> Counter:
    return Counter(o.kind for o in outgoing)


def wait_for_leaders(
    bootstrap: str, topic: str, timeout: float = 90.0, group: str = "leader-probe"
) -> None:
    """After a broker restart, wait until every partition of `topic` has a leader again and the
    coordinator of `group` serves its committed offsets (an unclean restart re-elects leaders and
    reloads the offsets topic some seconds after the broker answers)."""
    import time

    from orderflow_dagster.ingest.errors import KafkaUnavailableError

    consumer = kafka_source.open_consumer(bootstrap, group)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                parts = kafka_source.partitions(consumer, topic)
                kafka_source.watermarks(consumer, topic, parts)
                kafka_source.committed(consumer, topic, parts)
                return
            except KafkaUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        consumer.close()


class FakeMessage:
    """A Kafka record for the pure tests of the landing's line building: only the accessors
    `_Batch` reads (the Kafka side is covered by the integration tests)."""

    def __init__(self, value, key=b"k", headers=None):
        self._value, self._key, self._headers = value, key, headers

    def value(self):
        return self._value

    def key(self):
        return self._key

    def headers(self):
        return self._headers

    def offset(self):
        return 7

    def timestamp(self):
        return (1, 1_700_000_000_000)
