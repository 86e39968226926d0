"""The dbt project against a real Postgres, checked row for row against tests/oracle.py.

Needs the fixture `postgres_dsn` (tests/conftest.py): a DSN to a database these tests may use. Each
database test resets the raw, staging and analytics schemas in it, applies the landing schema,
inserts raw rows and runs `dbt build` through `run_dbt_build`, as `orderflow catch-up` does.

"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st
from oracle import (
    ORDER_STATUS_COLUMNS,
    ORDER_STATUS_HISTORY_COLUMNS,
    distinct_events,
    expected_conflicts,
    expected_order_status,
    expected_order_status_history,
    landed,
    read_customers_csv,
)
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orderflow_dagster.transform.dbt import (
    DBT_PROJECT_DIR,
    dbt_env_from_dsn,
    dbt_executable,
    run_dbt_build,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA_SQL = REPO / "orderflow_dagster" / "land" / "sql" / "schema.sql"
CUSTOMERS = read_customers_csv(DBT_PROJECT_DIR / "seeds" / "customers.csv")
ANALYTICS = "orderflow_marts_test"  # exercises ORDERFLOW_ANALYTICS_SCHEMA
STAGING = "orderflow_staging_test"
TOPIC = "orders.events"
PARTITIONS = 4
BASE_LANDED_AT = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
BASE_EVENT_MS = 1_709_294_400_000


# ---------------------------------------------------------------------------------------------
# dbt_env_from_dsn (pure)


def test_dbt_env_from_uri_dsn() -> None:
    env = dbt_env_from_dsn("postgresql://orderflow:s3cr%40t@db.example:15432/orders")
    assert env == {
        "ORDERFLOW_PG_HOST": "db.example",
        "ORDERFLOW_PG_PORT": "15432",
        "ORDERFLOW_PG_USER": "orderflow",
        "DBT_ENV_SECRET_ORDERFLOW_PG_PASSWORD": "s3cr@t",
        "ORDERFLOW_PG_DATABASE": "orders",
    }


def test_dbt_env_from_dsn_defaults_and_options() -> None:
    env = dbt_env_from_dsn("postgres://alice@localhost?sslmode=require")
    assert env == {
        "ORDERFLOW_PG_HOST": "localhost",
        "ORDERFLOW_PG_PORT": "5432",
        "ORDERFLOW_PG_USER": "alice",
        "DBT_ENV_SECRET_ORDERFLOW_PG_PASSWORD": "",
        "ORDERFLOW_PG_DATABASE": "alice",
        "ORDERFLOW_PG_SSLMODE": "require",
    }
    keyword_form = dbt_env_from_dsn("host=10.0.0.5 port=6543 user=bob password='a b' dbname=x")
    assert keyword_form["ORDERFLOW_PG_HOST"] == "10.0.0.5"
    assert keyword_form["ORDERFLOW_PG_PORT"] == "6543"
    assert keyword_form["DBT_ENV_SECRET_ORDERFLOW_PG_PASSWORD"] == "a b"
    assert keyword_form["ORDERFLOW_PG_DATABASE"] == "x"


@pytest.mark.parametrize(
    "dsn", ["postgresql://db.example:5432/x", "not a dsn", "postgresql://u@a,b/x"]
)
def test_dbt_env_from_dsn_rejects(dsn: str) -> None:
    with pytest.raises(ValueError):
        dbt_env_from_dsn(dsn)


# ---------------------------------------------------------------------------------------------
# the Dagster wiring (reads the manifest only)


def test_dagster_assets_keys_groups_and_checks() -> None:
    from dagster import AssetKey

    from orderflow_dagster.transform import orderflow_dbt_models

    specs = {spec.key: spec for spec in orderflow_dbt_models.specs}
    raw = AssetKey(["raw_order_events"])
    marts = ["order_events", "order_status", "order_status_history", "event_id_conflicts"]
    for name in marts:
        assert specs[AssetKey([name])].group_name == "marts"
    for name in ["stg_order_events", "stg_ingest_ledger", "customers", "products"]:
        assert specs[AssetKey([name])].group_name == "staging"
    # both raw tables are written by the one landing asset, defined elsewhere
    assert raw not in specs
    assert {dep.asset_key for dep in specs[AssetKey(["stg_order_events"])].deps} == {raw}
    assert {dep.asset_key for dep in specs[AssetKey(["stg_ingest_ledger"])].deps} == {raw}
    assert {dep.asset_key for dep in specs[AssetKey(["order_status"])].deps} == {
        AssetKey(["order_events"])
    }
    checks = {(check.asset_key, check.name) for check in orderflow_dbt_models.check_specs}
    order_status = AssetKey(["order_status"])
    assert (order_status, "order_status_one_row_per_order") in checks
    assert (order_status, "order_status_matches_last_event") in checks
    # the key is a constraint of the model's contract, not a test
    assert (order_status, "unique_order_status_order_id") not in checks


def test_assert_rows_equal_ignores_order_but_not_a_cent_or_a_null() -> None:
    rows = [
        {"order_id": "b", "order_total": Decimal("1.00"), "paid_at": None},
        {"order_id": "a", "order_total": Decimal("2.50"), "paid_at": BASE_LANDED_AT},
    ]
    assert_rows_equal(rows, list(reversed(rows)), key=["order_id"])
    for changed in ({"order_total": Decimal("1.01")}, {"paid_at": BASE_LANDED_AT}):
        with pytest.raises(AssertionError):
            assert_rows_equal(rows, [rows[0] | changed, rows[1]], key=["order_id"])
    with pytest.raises(AssertionError):
        assert_rows_equal(rows, [rows[0] | {"extra": 1}, rows[1]], key=["order_id"])


# ---------------------------------------------------------------------------------------------
# the oracle itself (pure)


def test_oracle_first_landed_copy_wins_and_status_ignores_arrival() -> None:
    created = _envelope("ord-1", "OrderCreated", 1000, {"customer_id": "cust-0001"}, version=1)
    delivered = _envelope("ord-1", "OrderDelivered", 3000, {"signed_by": None})
    shipped = _envelope("ord-1", "ItemShipped", 2000, {"carrier": "DHL"})
    late = BASE_LANDED_AT + timedelta(minutes=1)
    records = [
        landed(created, topic=TOPIC, kafka_partition=1, kafka_offset=5, landed_at=late),
        landed(delivered, topic=TOPIC, kafka_partition=0, kafka_offset=1, landed_at=BASE_LANDED_AT),
        landed(shipped, topic=TOPIC, kafka_partition=0, kafka_offset=2, landed_at=late),
        # the same event_id landed earlier on another partition, with other content: it wins
        landed(
            {**created, "payload": {"customer_id": "cust-0002"}},
            topic=TOPIC,
            kafka_partition=3,
            kafka_offset=9,
            landed_at=BASE_LANDED_AT,
        ),
    ]
    assert distinct_events(records)[created["event_id"]]["kafka_partition"] == 3
    [row] = expected_order_status(records, CUSTOMERS)
    assert row["status"] == "delivered"
    assert row["customer_id"] == "cust-0002"
    assert row["channel"] == "web"
    assert row["event_count"] == 3
    assert expected_conflicts(records) == {created["event_id"]: (2, 2)}


# ---------------------------------------------------------------------------------------------
# dbt against Postgres


@pytest.fixture
def dbt_dsn(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """postgres_dsn's database holding the landing schema and nothing else."""
    monkeypatch.setenv("ORDERFLOW_ANALYTICS_SCHEMA", ANALYTICS)
    monkeypatch.setenv("ORDERFLOW_STAGING_SCHEMA", STAGING)
    _reset_schemas(postgres_dsn)  # in case the database is shared with earlier tests
    yield postgres_dsn
    _reset_schemas(postgres_dsn, recreate=False)


def test_incremental_rounds_match_oracle_and_full_refresh(dbt_dsn: str) -> None:
    """Several landing rounds, each followed by an incremental build: after every build the marts
    equal the oracle over everything landed so far; a full refresh then changes nothing."""
    batches = scenario(seed=7, n_orders=80)
    assert len(batches) > 40, "the scenario should span more than the lookback window"
    rounds = [batches[:15], batches[15:22], batches[22:23], batches[23:]]
    landed_so_far: list[dict[str, Any]] = []
    for round_batches in rounds:
        for batch in round_batches:
            insert_records(dbt_dsn, batch)
            landed_so_far += batch
        run_dbt_build(dbt_dsn)
        assert_marts_match_oracle(dbt_dsn, landed_so_far)

    run_dbt_build(dbt_dsn)  # nothing new: nothing changes
    assert_marts_match_oracle(dbt_dsn, landed_so_far)
    incremental = snapshot_marts(dbt_dsn)

    run_dbt_build(dbt_dsn, full_refresh=True)
    assert_marts_match_oracle(dbt_dsn, landed_so_far)
    assert snapshot_marts(dbt_dsn) == incremental

    # the scenario covers what it claims to
    statuses = {
        row["status"] for row in fetch(dbt_dsn, f"select status from {ANALYTICS}.order_status")
    }
    assert statuses == {"created", "paid", "shipped", "delivered", "cancelled"}
    headless = fetch(
        dbt_dsn, f"select count(*) as n from {ANALYTICS}.order_status where customer_id is null"
    )
    assert headless[0]["n"] > 0
    conflicts = fetch(dbt_dsn, f"select * from {ANALYTICS}.event_id_conflicts")
    assert len(conflicts) > 0
    [twin] = fetch(
        dbt_dsn,
        f"select kafka_partition from {ANALYTICS}.order_events where order_id = 'ord-7-twin'",
    )
    assert twin["kafka_partition"] == 1
    channels = fetch(dbt_dsn, f"select distinct channel from {ANALYTICS}.order_events")
    assert {"web", "mobile"} <= {row["channel"] for row in channels}


def test_rows_committed_after_a_build_are_modelled_whatever_their_landed_at(dbt_dsn: str) -> None:
    """event_copies reads raw by commit order: rows committed after a build are read by the next
    incremental build, however far their landed_at (their transaction's start) lies behind what
    was modelled before. Without a recorded read (incremental_runs dropped) a build reads raw
    whole again, and a full refresh agrees."""
    landed_so_far = [record for batch in scenario(seed=11, n_orders=20) for record in batch]
    newest = max(record["landed_at"] for record in landed_so_far)
    offsets = next_offsets(landed_so_far)
    created = _envelope("ord-late", "OrderCreated", BASE_EVENT_MS, {"customer_id": "cust-0007"})
    first_seen = landed(
        created,
        topic=TOPIC,
        kafka_partition=2,
        kafka_offset=offsets.take(2),
        landed_at=newest + timedelta(minutes=1),
    )
    landed_so_far.append(first_seen)
    insert_records(dbt_dsn, landed_so_far)
    run_dbt_build(dbt_dsn)
    assert_marts_match_oracle(dbt_dsn, landed_so_far)

    # Committed after that build, by transactions that started before first_seen's (minutes,
    # days): another version of its event (so it becomes the winner), a cancellation of its
    # order, and a new order.
    late_version = landed(
        {**created, "payload": {**created["payload"], "order_total": "1.23"}},
        topic=TOPIC,
        kafka_partition=0,
        kafka_offset=offsets.take(0),
        landed_at=first_seen["landed_at"] - timedelta(minutes=5),
    )
    cancel = landed(
        _envelope("ord-late", "OrderCancelled", BASE_EVENT_MS + 1, {"reason": "late"}),
        topic=TOPIC,
        kafka_partition=1,
        kafka_offset=offsets.take(1),
        landed_at=first_seen["landed_at"] - timedelta(days=2),
    )
    much_later = landed(
        _envelope("ord-days-late", "OrderCreated", BASE_EVENT_MS, {"customer_id": "cust-0001"}),
        topic=TOPIC,
        kafka_partition=3,
        kafka_offset=offsets.take(3),
        landed_at=first_seen["landed_at"] - timedelta(days=30),
    )
    insert_records(dbt_dsn, [late_version, cancel, much_later])
    landed_so_far += [late_version, cancel, much_later]
    run_dbt_build(dbt_dsn)
    assert_marts_match_oracle(dbt_dsn, landed_so_far)
    [row] = fetch(
        dbt_dsn,
        f"select status, order_total from {ANALYTICS}.order_status where order_id = 'ord-late'",
    )
    assert row == {"status": "cancelled", "order_total": Decimal("1.23")}

    # The record of past reads lost: the next build reads raw whole, appends what is missing.
    with psycopg.connect(dbt_dsn) as conn:
        conn.execute(sql.SQL("drop table {}").format(sql.Identifier(ANALYTICS, "incremental_runs")))
    again = landed(
        _envelope("ord-after-drop", "OrderCreated", BASE_EVENT_MS, {"customer_id": "cust-0002"}),
        topic=TOPIC,
        kafka_partition=0,
        kafka_offset=offsets.take(0),
        landed_at=BASE_LANDED_AT - timedelta(days=1),
    )
    insert_records(dbt_dsn, [again])
    landed_so_far.append(again)
    run_dbt_build(dbt_dsn)
    assert_marts_match_oracle(dbt_dsn, landed_so_far)
    incremental = snapshot_marts(dbt_dsn)
    run_dbt_build(dbt_dsn, full_refresh=True)
    assert snapshot_marts(dbt_dsn) == incremental


def test_the_incremental_models_read_committed_whatever_the_database_default(
    dbt_dsn: str,
) -> None:
    """With repeatable read as the database's default, an order_events run that waits for the
    project's lock while another invocation's event_copies run commits still reads those copies:
    its statements take their snapshot after the wait, as its stamp is taken after it. Also when
    dbt first drops relations a killed build left behind."""
    with psycopg.connect(dbt_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "alter database {} set default_transaction_isolation = 'repeatable read'"
            ).format(sql.Identifier(conn.info.dbname))
        )
    records = [record for batch in scenario(seed=17, n_orders=20) for record in batch]
    first, second, third = records[:30], records[30:50], records[50:]
    insert_records(dbt_dsn, first)
    run_dbt_build(dbt_dsn)
    # copies order_events has not modelled yet, so that its next run writes rows (and a stamp)
    insert_records(dbt_dsn, second)
    dbt_run_only(dbt_dsn, ["event_copies"])
    with psycopg.connect(dbt_dsn, autocommit=True) as conn:
        assert conn.execute("show transaction_isolation").fetchone()[0] == "repeatable read"
        # what a build killed after its commit, before dbt dropped its backup, leaves
        for model in ("event_copies", "order_events"):
            conn.execute(
                sql.SQL("create table {} (x integer)").format(
                    sql.Identifier(ANALYTICS, f"{model}__dbt_backup")
                )
            )

    holder = psycopg.connect(dbt_dsn, autocommit=True)
    holder.execute("select pg_advisory_lock(hashtext('orderflow.dbt.incremental_marts'))")
    failures: list[BaseException] = []

    def build_order_events() -> None:
        try:
            dbt_run_only(dbt_dsn, ["order_events"])
        except BaseException as exc:  # re-raised below, in the test's thread
            failures.append(exc)

    waiting = threading.Thread(target=build_order_events)
    waiting.start()
    try:
        _wait_for_lock_wait(dbt_dsn)
        # another invocation's event_copies run, while this one's order_events waits for its turn
        insert_records(dbt_dsn, third)
        holder.execute(
            sql.SQL(
                "insert into {copies} select event_id, order_id, content_hash, topic,"
                " kafka_partition, kafka_offset, landed_at, statement_timestamp() from {staged} s"
                " where not exists (select from {copies} c where c.topic = s.topic"
                " and c.kafka_partition = s.kafka_partition and c.kafka_offset = s.kafka_offset)"
            ).format(
                copies=sql.Identifier(ANALYTICS, "event_copies"),
                staged=sql.Identifier(STAGING, "stg_order_events"),
            )
        )
    finally:
        holder.close()
        waiting.join(timeout=300)
    if failures:
        raise failures[0]
    run_dbt_build(dbt_dsn)
    assert_marts_match_oracle(dbt_dsn, records)


@pytest.mark.parametrize("statistics", ["analyzed", "none"])
def test_an_incremental_build_does_work_linear_in_the_events_it_touches(
    dbt_dsn: str, statistics: str
) -> None:
    """Each incremental mart statement, run on a slice touching many orders, handles at most a
    few rows per event of the slice at any plan node: no plan whose work is the product of two
    slices (a nested loop rescanning a CTE once per touched order, say), whatever Postgres
    estimates for CTEs it cannot size, and with the tables it reads analyzed or not (a table
    autovacuum has not reached yet). The work is read from EXPLAIN ANALYZE: rows times loops per
    node, a count of rows, not a time."""
    for batch in scenario(seed=11, n_orders=200):
        insert_records(dbt_dsn, batch)
    run_dbt_build(dbt_dsn)

    # a slice of 1,500 new orders, on offsets past the first scenario's
    slice_records = [
        {**record, "kafka_offset": record["kafka_offset"] + 1_000_000}
        for batch in scenario(seed=12, n_orders=1_500)
        for record in batch
    ]
    insert_records(dbt_dsn, slice_records)
    slice_events = len({record["event_id"] for record in slice_records})
    unanalyzed = statistics == "none"

    work: dict[str, float] = {}
    dbt_run_only(dbt_dsn, ["event_copies"])
    work["order_events"] = _explained_work(dbt_dsn, "order_events", unanalyzed=unanalyzed)
    dbt_run_only(dbt_dsn, ["order_events"])
    for model in ["order_status", "order_status_history"]:
        work[model] = _explained_work(dbt_dsn, model, unanalyzed=unanalyzed)

    bound = 4 * slice_events
    assert all(rows <= bound for rows in work.values()), (work, bound)
    # the slice is what the statements read: they touched every event of it
    assert work["order_status_history"] >= slice_events, (work, slice_events)


def test_a_first_build_does_work_linear_in_the_events_on_tables_never_analyzed(
    dbt_dsn: str,
) -> None:
    """A deployment's first build (or a full refresh) creates each mart just before the next one
    reads it, long before autovacuum analyzes it: every mart statement still handles at most a
    few rows per landed row at any plan node."""
    records = [record for batch in scenario(seed=13, n_orders=1_500) for record in batch]
    insert_records(dbt_dsn, records)
    landed_rows = len(records)

    work: dict[str, float] = {}
    _dbt(dbt_dsn, "seed", ["customers"])
    dbt_run_only(dbt_dsn, ["stg_order_events"])
    work["event_copies"] = _explained_work(dbt_dsn, "event_copies", unanalyzed=True)
    for model, parent in [
        ("order_events", "event_copies"),
        ("order_status", "order_events"),
        ("order_status_history", "order_events"),
    ]:
        dbt_run_only(dbt_dsn, [parent])
        work[model] = _explained_work(dbt_dsn, model, unanalyzed=True)

    bound = 4 * landed_rows
    assert all(rows <= bound for rows in work.values()), (work, bound)
    assert work["event_copies"] >= landed_rows, (work, landed_rows)


def _explained_work(dsn: str, model: str, *, unanalyzed: bool = False) -> float:
    """The most rows any node of `model`'s compiled select handles, over all its loops, from
    EXPLAIN ANALYZE run in a transaction that is rolled back. `unanalyzed`: first clear the
    statistics of every table dbt writes (the staging and analytics schemas), as in a first
    build: raw, written all along, has been analyzed."""
    target = _dbt(dsn, "compile", [model])
    [compiled] = (target / "compiled").rglob(f"{model}.sql")
    select = compiled.read_text()

    def node_work(node: Mapping[str, Any]) -> float:
        own = float(node["Actual Rows"]) * float(node["Actual Loops"])
        return max([own, *(node_work(child) for child in node.get("Plans", []))])

    with psycopg.connect(dsn) as conn:
        if unanalyzed:
            conn.execute(
                """
                select
                    pg_clear_relation_stats(schemaname, relname),
                    (
                        select count(pg_clear_attribute_stats(schemaname, relname, attname, false))
                        from pg_attribute
                        where attrelid = relid and attnum > 0 and not attisdropped
                    )
                from pg_stat_user_tables
                where schemaname = any(%s)
                """,
                ([STAGING, ANALYTICS],),
            )
        [[plan]] = conn.execute(
            sql.SQL("explain (analyze, format json) {}").format(sql.SQL(select))
        ).fetchall()
        conn.rollback()
    return node_work(plan[0]["Plan"])


def dbt_run_only(dsn: str, models: Sequence[str]) -> None:
    """`dbt run` of `models` alone, without their tests or the models after them: what a build
    that failed after them leaves (the tests of order_events expect order_status built too)."""
    _dbt(dsn, "run", models)


def _dbt(dsn: str, command: str, models: Sequence[str]) -> Path:
    """One dbt `command` on `models`, in a target directory of its own, which it returns."""
    target = DBT_PROJECT_DIR / "target" / f"dbt_{command}_only"
    args = [command, "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR)]
    done = subprocess.run(
        # no tests: the models' tests compile against the relations of the models after them
        [dbt_executable(), *args, "--indirect-selection", "empty", "--select", *models],
        cwd=DBT_PROJECT_DIR,
        env={
            **os.environ,
            **dbt_env_from_dsn(dsn),
            "DBT_TARGET_PATH": str(target),
            "DBT_LOG_PATH": str(target),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return target


def _wait_for_lock_wait(dsn: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute(
                "select exists (select from pg_locks where locktype = 'advisory'"
                " and not granted and database = (select oid from pg_database"
                " where datname = current_database()))"
            ).fetchone()[0]:
                return
            time.sleep(0.1)
    raise AssertionError("no dbt model started waiting for the lock")


# events of the hypothesis test below: each index a fixed event, which copies may assign to any
# of a few orders, in any landing order
MOVING_EVENT_TYPES = [
    "OrderCreated",
    "PaymentProcessed",
    "ItemShipped",
    "OrderDelivered",
    "OrderCancelled",
]
MOVING_ORDERS = ["ord-m-0", "ord-m-1", "ord-m-2", "ord-m-3"]
# (event index, order index, landed_at in minutes from BASE_LANDED_AT, partition)
copies_strategy = st.lists(
    st.tuples(
        st.integers(0, len(MOVING_EVENT_TYPES) - 1),
        st.integers(0, len(MOVING_ORDERS) - 1),
        st.integers(-60, 60),
        st.integers(0, PARTITIONS - 1),
    ),
    min_size=1,
    max_size=6,
)
# what each round builds: everything, or only the first models, as a build that failed midway
build_strategy = st.sampled_from(["all", "event_copies order_events", "event_copies", "nothing"])


def _moving_copy(event: int, order: int) -> dict[str, Any]:
    event_type = MOVING_EVENT_TYPES[event]
    return {
        "event_id": str(uuid.UUID(int=0xE0 + event)),
        "aggregate_id": MOVING_ORDERS[order],
        "event_type": event_type,
        "payload": payload_for(random.Random(event), event_type, event),
        "timestamp": BASE_EVENT_MS + 1000 * event,
        "schema_version": 1,
    }


@pytest.mark.slow
@seed(int(os.environ.get("ORDERFLOW_TEST_MOVES_SEED", "4")))
@settings(
    max_examples=int(os.environ.get("ORDERFLOW_TEST_MOVES_EXAMPLES", "3")),
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rounds=st.lists(st.tuples(copies_strategy, build_strategy), min_size=1, max_size=4))
@example(
    # event 0 moves ord-0 -> ord-1 (a build stops after order_events) -> ord-2; event 2 leaves
    # ord-3, its only order's event, and event 1 keeps ord-0 alive
    rounds=[
        ([(0, 0, 0, 0), (1, 0, 1, 1), (2, 3, 0, 2)], "all"),
        ([(0, 1, -10, 2)], "event_copies order_events"),
        ([(0, 2, -20, 3), (2, 2, -30, 1)], "all"),
    ]
)
def test_the_marts_equal_a_full_refresh_whatever_order_copies_commit_in(
    dbt_dsn: str, rounds: list[tuple[list[tuple[int, int, int, int]], str]]
) -> None:
    """Copies of a few events, naming different orders, commit in rounds with arbitrary landed_at
    (a copy ordered first may commit last, so a winner moves between orders, any number of
    times); each round is followed by a whole build, a build that stops after event_copies or
    order_events (as a failed build would), or none. After every whole build, and at the end,
    the marts equal the oracle; a full refresh changes nothing."""
    _reset_schemas(dbt_dsn)
    run_dbt_build(dbt_dsn)  # seeds and views exist, as after any earlier build
    offsets = PartitionOffsets()
    landed_so_far: list[dict[str, Any]] = []
    for copies, build in rounds:
        batch = [
            landed(
                _moving_copy(event, order),
                topic=TOPIC,
                kafka_partition=partition,
                kafka_offset=offsets.take(partition),
                landed_at=BASE_LANDED_AT + timedelta(minutes=minutes),
            )
            for event, order, minutes, partition in copies
        ]
        insert_records(dbt_dsn, batch)
        landed_so_far += batch
        if build == "all":
            run_dbt_build(dbt_dsn)
            assert_marts_match_oracle(dbt_dsn, landed_so_far)
        elif build != "nothing":
            dbt_run_only(dbt_dsn, build.split())
    run_dbt_build(dbt_dsn)
    assert_marts_match_oracle(dbt_dsn, landed_so_far)
    incremental = snapshot_marts(dbt_dsn)
    run_dbt_build(dbt_dsn, full_refresh=True)
    assert snapshot_marts(dbt_dsn) == incremental


def test_keys_are_constraints_and_tests_check_the_latest_run(dbt_dsn: str) -> None:
    """The marts' keys, not-null columns and accepted values are enforced by Postgres for every
    row; a routine build's data tests check the rows its models wrote, a full check every row."""
    records = [record for batch in scenario(seed=5, n_orders=30) for record in batch]
    insert_records(dbt_dsn, records[:40])
    run_dbt_build(dbt_dsn)
    insert_records(dbt_dsn, records[40:])
    run_dbt_build(dbt_dsn)
    assert_marts_match_oracle(dbt_dsn, records)

    order_status = sql.Identifier(ANALYTICS, "order_status")
    order_events = sql.Identifier(ANALYTICS, "order_events")
    history = sql.Identifier(ANALYTICS, "order_status_history")
    violations = [
        (psycopg.errors.UniqueViolation, "insert into {} select * from {} limit 1", order_status),
        (psycopg.errors.UniqueViolation, "insert into {} select * from {} limit 1", order_events),
        (psycopg.errors.UniqueViolation, "update {} set sequence_number = 1", history),
        (psycopg.errors.NotNullViolation, "update {} set order_id = null", order_events),
        (psycopg.errors.CheckViolation, "update {} set status = 'lost'", order_status),
        (psycopg.errors.CheckViolation, "update {} set event_type = 'Refunded'", order_events),
    ]
    with psycopg.connect(dbt_dsn) as conn:
        for error, statement, table in violations:
            with pytest.raises(error), conn.transaction():
                tables = [table, table] if statement.count("{}") == 2 else [table]
                conn.execute(sql.SQL(statement).format(*tables))

    # An order the last build recomputed, and one it did not.
    recent, older = (
        fetch(
            dbt_dsn,
            f"select order_id from {ANALYTICS}.order_status where updated_at {op}"
            f" (select max(updated_at) from {ANALYTICS}.order_status) order by order_id limit 1",
        )[0]["order_id"]
        for op in ("=", "<")
    )
    corrupt = sql.SQL("update {} set event_count = event_count + 1 where order_id = %s").format(
        order_status
    )
    # A manual edit of an older row: a routine build checks the rows it writes, a full check all.
    with psycopg.connect(dbt_dsn) as conn:
        conn.execute(corrupt, [older])
    run_dbt_build(dbt_dsn)
    with pytest.raises(RuntimeError, match="order_status_matches_last_event"):
        run_dbt_build(dbt_dsn, dbt_vars={"data_tests_scope": "all"})

    # A row stamped as written by the next build (as a faulty model run would write it) is
    # checked by that build.
    with psycopg.connect(dbt_dsn) as conn:
        conn.execute(
            sql.SQL("update {} set event_count = event_count - 1 where order_id = %s").format(
                order_status
            ),
            [older],
        )
        conn.execute(
            sql.SQL(
                "update {} set event_count = event_count + 1,"
                " updated_at = now() + interval '1 hour' where order_id = %s"
            ).format(order_status),
            [recent],
        )
    with pytest.raises(RuntimeError, match="order_status_matches_last_event"):
        run_dbt_build(dbt_dsn)


def test_unit_tests_pass(dbt_dsn: str) -> None:
    """dbt's unit tests are left out of the pipeline's builds; CI runs them here (in a build: a
    unit test reads its inputs' columns from the relations built before it)."""
    run_dbt_build(dbt_dsn, unit_tests=True)


def test_run_dbt_build_failure_quotes_dbt_output() -> None:
    with pytest.raises(RuntimeError, match="dbt build failed") as failure:
        run_dbt_build("postgresql://nobody@127.0.0.1:9/nowhere", select="stg_ingest_ledger")
    assert "port 9 failed" in str(failure.value)


@pytest.mark.slow
def test_dagster_materializes_dbt_assets(dbt_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The @dbt_assets definition runs `dbt build` with the DSN from ORDERFLOW_POSTGRES_DSN."""
    from dagster import AssetCheckSeverity, AssetKey, materialize

    from orderflow_dagster.transform import dbt_resource, orderflow_dbt_models

    records = [record for batch in scenario(seed=3, n_orders=5) for record in batch]
    insert_records(dbt_dsn, records)
    monkeypatch.setenv("ORDERFLOW_POSTGRES_DSN", dbt_dsn)
    for name, value in dbt_env_from_dsn(dbt_dsn).items():
        monkeypatch.setenv(name, value)  # the asset sets them; undo that after the test
    result = materialize([orderflow_dbt_models], resources={"dbt": dbt_resource()})
    assert result.success
    materialized = {event.asset_key for event in result.get_asset_materialization_events()}
    assert AssetKey(["order_status"]) in materialized
    failed = {
        check.check_name
        for check in result.get_asset_check_evaluations()
        if not check.passed and check.severity == AssetCheckSeverity.ERROR
    }
    assert not failed
    # cust-9999 (order 4 of the scenario) is not in the seed: a warning, not a failure
    warned = {
        check.check_name for check in result.get_asset_check_evaluations() if not check.passed
    }
    assert warned == {
        "relationships_order_status_customer_id__customer_id__ref_customers_",
        "relationships_order_events_customer_id__customer_id__ref_customers_",
    }
    assert_marts_match_oracle(dbt_dsn, records)


@pytest.mark.slow
def test_dagster_materialization_reports_described_columns_and_lineage(
    dbt_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build through Dagster records each model's columns (names and types from the database,
    descriptions from its yml) and which upstream columns each is computed from."""
    from dagster import AssetKey, materialize

    from orderflow_dagster.transform import (
        dbt_resource,
        orderflow_dbt_models,
        orderflow_dbt_project,
    )

    insert_records(dbt_dsn, [r for batch in scenario(seed=5, n_orders=3) for r in batch])
    monkeypatch.setenv("ORDERFLOW_POSTGRES_DSN", dbt_dsn)
    monkeypatch.setenv("ORDERFLOW_DBT_COLUMN_METADATA", "lineage")
    for name, value in dbt_env_from_dsn(dbt_dsn).items():
        monkeypatch.setenv(name, value)
    result = materialize([orderflow_dbt_models], resources={"dbt": dbt_resource()})
    assert result.success
    order_status = AssetKey(["order_status"])
    [materialization] = [
        event.materialization
        for event in result.get_asset_materialization_events()
        if event.asset_key == order_status
    ]
    manifest = json.loads(Path(orderflow_dbt_project.manifest_path).read_text())
    declared = manifest["nodes"]["model.orderflow.order_status"]["columns"]
    schema = materialization.metadata["dagster/column_schema"].value
    assert [(c.name, c.description) for c in schema.columns] == [
        (name, column["description"]) for name, column in declared.items()
    ]
    assert {c.name: c.type for c in schema.columns}["order_total"] == "numeric(12,2)"
    lineage = materialization.metadata["dagster/column_lineage"].value.deps_by_column
    order_events = AssetKey(["order_events"])
    assert (order_events, "customer_name") in {
        (d.asset_key, d.column_name) for d in lineage["customer_name"]
    }
    assert (order_events, "event_type") in {(d.asset_key, d.column_name) for d in lineage["status"]}


# ---------------------------------------------------------------------------------------------
# checks


def assert_marts_match_oracle(dsn: str, records: Sequence[Mapping[str, Any]]) -> None:
    columns = ", ".join(ORDER_STATUS_COLUMNS)
    assert_rows_equal(
        fetch(dsn, f"select {columns} from {ANALYTICS}.order_status"),
        expected_order_status(records, CUSTOMERS),
        key=["order_id"],
    )
    columns = ", ".join(ORDER_STATUS_HISTORY_COLUMNS)
    assert_rows_equal(
        fetch(dsn, f"select {columns} from {ANALYTICS}.order_status_history"),
        expected_order_status_history(records),
        key=["order_id", "sequence_number"],
    )

    winners = {
        event_id: (record["topic"], record["kafka_partition"], record["kafka_offset"])
        for event_id, record in distinct_events(records).items()
    }
    actual_winners = {
        row["event_id"]: (row["topic"], row["kafka_partition"], row["kafka_offset"])
        for row in fetch(
            dsn,
            f"select event_id, topic, kafka_partition, kafka_offset from {ANALYTICS}.order_events",
        )
    }
    assert actual_winners == winners

    conflicts = {
        row["event_id"]: (row["copies"], row["distinct_versions"])
        for row in fetch(
            dsn, f"select event_id, copies, distinct_versions from {ANALYTICS}.event_id_conflicts"
        )
    }
    assert conflicts == expected_conflicts(records)


def assert_rows_equal(
    actual: Sequence[Mapping[str, Any]],
    expected: Sequence[Mapping[str, Any]],
    *,
    key: Sequence[str],
) -> None:
    """The rows equal, as sets of rows with the same columns, value for value as Python compares
    them (Decimal, datetime, UUID, None), whatever order either came in; a difference is reported
    as pandas shows it, by column and row, rather than as two long lists of dicts.

    Every column is kept as Python objects (dtype object): no value is converted to a float or a
    pandas timestamp, so nothing is compared less exactly than `==` would."""

    def frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        table = pd.DataFrame([dict(row) for row in rows], dtype=object)
        return table.sort_values(list(key), kind="stable").reset_index(drop=True)

    assert len(actual) == len(expected)
    if expected:
        # check_like: column order aside, as dict equality; check_exact: no tolerance anywhere
        pd.testing.assert_frame_equal(
            frame(actual), frame(expected), check_like=True, check_exact=True
        )


def snapshot_marts(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every mart's rows, sorted, without the columns that record when dbt wrote them."""
    snapshot = {}
    for table in ["order_events", "order_status", "order_status_history", "event_id_conflicts"]:
        rows = fetch(dsn, f"select * from {ANALYTICS}.{table}")
        snapshot[table] = sorted(
            tuple(
                repr(value)
                for column, value in row.items()
                if column not in ("transformed_at", "updated_at")
            )
            for row in rows
        )
    return snapshot


def order_ids(dsn: str) -> set[str]:
    return {row["order_id"] for row in fetch(dsn, f"select order_id from {ANALYTICS}.order_status")}


# ---------------------------------------------------------------------------------------------
# synthetic landings


def scenario(*, seed: int, n_orders: int) -> list[list[dict[str, Any]]]:
    """Landing transactions (lists of landed records), one minute apart, in landing order.

    Covers: full lifecycles, cancellations (before and after payment), repeated shipments,
    events sharing a timestamp, orders whose OrderCreated never lands, v1 and v2 OrderCreated,
    unknown payload fields, money as numbers and strings, an unknown customer, identical copies on
    several partitions (also in one transaction), conflicting copies landing first or later, and
    events arriving out of event-time order.
    """
    rng = random.Random(seed)
    copies: list[dict[str, Any]] = []
    for n in range(n_orders):
        order_id = f"ord-{seed}-{n:04d}"
        for envelope in order_lifecycle(rng, order_id, n):
            copies.append(envelope)
            if rng.random() < 0.3:  # producer retry or replay: an identical copy
                copies.append(dict(envelope))
            if rng.random() < 0.1:  # a conflicting version of the same event_id
                changed = {**envelope, "payload": {**envelope["payload"], "note": f"v{n}"}}
                copies.append(changed)
    rng.shuffle(copies)  # arrival order is not event order

    offsets = PartitionOffsets()
    batches = []
    position = 0
    while position < len(copies):
        size = rng.randint(1, 8)
        landed_at = BASE_LANDED_AT + timedelta(minutes=len(batches))
        batch = []
        for envelope in copies[position : position + size]:
            partition = rng.randrange(PARTITIONS)
            batch.append(
                landed(
                    envelope,
                    topic=TOPIC,
                    kafka_partition=partition,
                    kafka_offset=offsets.take(partition),
                    landed_at=landed_at,
                    trace_id=f"trace-{rng.randrange(10**6)}" if rng.random() < 0.7 else None,
                )
            )
        batches.append(batch)
        position += size
    # two copies of a new event in one transaction, on two partitions: the lower partition wins
    twin = _envelope(
        f"ord-{seed}-twin", "OrderCreated", BASE_EVENT_MS, {"customer_id": "cust-0001"}
    )
    landed_at = BASE_LANDED_AT + timedelta(minutes=len(batches))
    batches.append(
        [
            landed(
                twin,
                topic=TOPIC,
                kafka_partition=3,
                kafka_offset=offsets.take(3),
                landed_at=landed_at,
            ),
            landed(
                twin,
                topic=TOPIC,
                kafka_partition=1,
                kafka_offset=offsets.take(1),
                landed_at=landed_at,
            ),
        ]
    )
    return batches


def order_lifecycle(rng: random.Random, order_id: str, n: int) -> list[dict[str, Any]]:
    kind = [
        ["OrderCreated", "PaymentProcessed", "ItemShipped", "OrderDelivered"],
        ["OrderCreated", "OrderCancelled"],
        ["OrderCreated", "PaymentProcessed", "OrderCancelled"],
        ["OrderCreated", "PaymentProcessed"],
        ["OrderCreated"],
        ["OrderCreated", "PaymentProcessed", "ItemShipped", "ItemShipped", "OrderDelivered"],
        ["PaymentProcessed", "ItemShipped"],  # OrderCreated never lands
    ][n % 7]
    timestamp = BASE_EVENT_MS + n * 3_600_000
    envelopes = []
    for event_type in kind:
        if rng.random() > 0.2:  # else: the same millisecond as the previous event
            timestamp += rng.randint(1, 120_000)
        envelopes.append(
            _envelope(order_id, event_type, timestamp, payload_for(rng, event_type, n), rng=rng)
        )
    return envelopes


def payload_for(rng: random.Random, event_type: str, n: int) -> dict[str, Any]:
    cents = rng.randint(100, 99_999)
    money: Any = cents / 100 if rng.random() < 0.5 else f"{cents // 100}.{cents % 100:02d}"
    if event_type == "OrderCreated":
        payload: dict[str, Any] = {
            "customer_id": "cust-9999" if n == 4 else f"cust-{rng.randint(1, 500):04d}",
            "order_total": money,
            "currency": rng.choice(["EUR", "USD"]),
            "items": [
                {
                    "sku": f"SKU-{rng.randint(1, 200):04d}",
                    "qty": rng.randint(1, 3),
                    "unit_price": 9.5,
                }
                for _ in range(rng.randint(1, 3))
            ],
        }
        if rng.random() < 0.3:
            payload["loyalty_tier"] = "gold"  # unknown field, ignored
        return payload
    if event_type == "PaymentProcessed":
        return {
            "payment_id": f"pay-{rng.randrange(10**6)}",
            "amount": money,
            "currency": "EUR",
            "method": rng.choice(["card", "paypal"]),
        }
    if event_type == "ItemShipped":
        return {
            "shipment_id": f"shp-{rng.randrange(10**6)}",
            "carrier": "DHL",
            "tracking_number": str(rng.randrange(10**9)),
        }
    if event_type == "OrderDelivered":
        return {"signed_by": rng.choice([None, "A. Person"])}
    return {"reason": rng.choice(["customer_request", "payment_failed"])}


def _envelope(
    order_id: str,
    event_type: str,
    timestamp: int,
    payload: dict[str, Any],
    *,
    version: int | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    rng = rng or random.Random(f"{order_id}/{event_type}/{timestamp}")
    if version is None:
        version = rng.choice([1, 2]) if event_type == "OrderCreated" else 1
    if event_type == "OrderCreated" and version == 2:
        payload = {**payload, "channel": rng.choice(["web", "mobile", "store"])}
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "aggregate_id": order_id,
        "event_type": event_type,
        "payload": payload,
        "timestamp": timestamp,
        "schema_version": version,
    }


def _strip(record: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope of a landed record."""
    keys = ("event_id", "aggregate_id", "event_type", "payload", "timestamp", "schema_version")
    return {key: record[key] for key in keys}


class PartitionOffsets:
    def __init__(self, start: Mapping[int, int] | None = None) -> None:
        self.next = dict(start or {})

    def take(self, partition: int) -> int:
        offset = self.next.get(partition, 0)
        self.next[partition] = offset + 1
        return offset


def next_offsets(records: Sequence[Mapping[str, Any]]) -> PartitionOffsets:
    start: dict[int, int] = {}
    for record in records:
        start[record["kafka_partition"]] = max(
            start.get(record["kafka_partition"], 0), record["kafka_offset"] + 1
        )
    return PartitionOffsets(start)


# ---------------------------------------------------------------------------------------------
# database helpers


def insert_records(dsn: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Land records as the landing code would, but with the landed_at they carry."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            """
            insert into raw.order_events (
                topic, kafka_partition, kafka_offset, event_id, aggregate_id, event_type,
                schema_version, event_ts_ms, payload, trace_id, landed_at, run_id
            ) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            [
                (
                    record["topic"],
                    record["kafka_partition"],
                    record["kafka_offset"],
                    record["event_id"],
                    record["aggregate_id"],
                    record["event_type"],
                    record["schema_version"],
                    record["timestamp"],
                    Jsonb(record["payload"]),
                    record.get("trace_id"),
                    record["landed_at"],
                    "test",
                )
                for record in records
            ],
        )


def fetch(dsn: str, query: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(query, params).fetchall()
    return [
        {key: str(value) if isinstance(value, uuid.UUID) else value for key, value in row.items()}
        for row in rows
    ]


def _reset_schemas(dsn: str, *, recreate: bool = True) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in ["raw", STAGING, ANALYTICS]:
            conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(schema)))
        if recreate:
            conn.execute(SCHEMA_SQL.read_text())


def test_an_out_of_sync_incremental_model_is_told_apart_from_other_dbt_failures():
    from orderflow_dagster.transform.dbt import marts_out_of_date

    assert marts_out_of_date(
        [
            "Compilation Error in model order_events (models/marts/order_events.sql)",
            "  The source and target schemas on this incremental model are out of sync!",
        ]
    )
    assert not marts_out_of_date(["Database Error in model order_status", "  syntax error"])
