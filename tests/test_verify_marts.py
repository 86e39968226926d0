"""`orderflow verify`'s checks of the marts against raw, on real Postgres and dbt: each check
passes on what builds leave, also halfway through a build, and fails on the bad state it guards
against, built here by hand."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from orderflow_dagster.serve.verify import Check, mart_checks
from orderflow_dagster.transform.dbt import run_dbt_build
from tests.test_dbt_models import (
    ANALYTICS,
    STAGING,
    _reset_schemas,
    dbt_run_only,
    insert_records,
    scenario,
)

REACHED = "every raw row reached the marts"
HAS_STATUS = "every order with events has a status"


@pytest.fixture
def built(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list]]:
    """A database whose marts were built from the first half of a scenario's records; the
    second half is returned for the test to land."""
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", ANALYTICS)
    monkeypatch.setenv("ORDERFLOW_STAGING_SCHEMA", STAGING)
    _reset_schemas(postgres_dsn)
    records = [record for batch in scenario(seed=21, n_orders=16) for record in batch]
    half = len(records) // 2
    insert_records(postgres_dsn, records[:half])
    run_dbt_build(postgres_dsn)
    yield postgres_dsn, records[half:]
    _reset_schemas(postgres_dsn, recreate=False)


def check(dsn: str, name: str) -> Check:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = on")  # as verify connects
        return next(c for c in mart_checks(conn, ANALYTICS) if c.name == name)


def execute(dsn: str, statement: str, *tables: str) -> int:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            sql.SQL(statement).format(*(sql.Identifier(ANALYTICS, t) for t in tables))
        )
        return cur.rowcount


@pytest.mark.parametrize("damaged", ["event_copies", "order_events"])
def test_verify_fails_when_a_raw_row_the_last_build_could_see_is_missing_from_the_marts(
    built, damaged
):
    dsn, later = built
    assert check(dsn, REACHED).ok
    # rows landed since the build, and a build stopped after event_copies, are no failure:
    # the last order_events run could not see those copies
    insert_records(dsn, later[: len(later) // 2])
    assert check(dsn, REACHED).ok
    dbt_run_only(dsn, ["event_copies"])
    assert check(dsn, REACHED).ok

    # a copy the last event_copies run read, or an event the last order_events run wrote, lost
    victim = (
        "delete from {} where (topic, kafka_partition, kafka_offset) ="
        " (select topic, kafka_partition, kafka_offset from {} order by transformed_at limit 1)"
    )
    assert execute(dsn, victim, damaged, damaged) == 1
    failed = check(dsn, REACHED)
    assert not failed.ok
    expected = "1 raw row(s)" if damaged == "event_copies" else "1 event_id(s)"
    assert expected in failed.detail


def test_verify_fails_when_an_order_with_events_has_no_status(built):
    dsn, later = built
    assert check(dsn, HAS_STATUS).ok
    # a build stopped after order_events: its new orders have no status yet, and need none
    insert_records(dsn, later)
    dbt_run_only(dsn, ["event_copies", "order_events"])
    assert check(dsn, HAS_STATUS).ok
    run_dbt_build(dsn)
    assert check(dsn, HAS_STATUS).ok

    deleted = execute(
        dsn,
        "delete from {} where order_id = (select order_id from {} order by order_id limit 1)",
        "order_status",
        "order_status",
    )
    assert deleted == 1
    failed = check(dsn, HAS_STATUS)
    assert not failed.ok
    assert failed.detail.startswith("1 order(s)")
