"""Scenario 7 through the UI's own path: a backfill of already-landed partitions, launched with the
webserver's `launchPartitionBackfill` GraphQL mutation (what the UI's "Materialize" dialog sends)
and executed by the real daemon, twice. Re-landing adds nothing: table checksums stay identical.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from dagster import DagsterInstance, RunsFilter

from orderflow_dagster.defs.assets import offset_ranges
from tests.dagster_processes import (
    dagster_daemon,
    dagster_webserver,
    free_port,
    wait_for_http,
    wait_until,
)
from tests.support import invariants, table_checksums
from tests.test_catch_up import cli
from tests.test_dagster_e2e import ASSET, PARTITION_TAG, ledger, run_summary

# ~560 messages, ~140 per Kafka partition: one range on each of the 4 partitions, so 4 partitions
# of raw_order_events and 4 runs per backfill (each run a fresh process: ~30 s on a busy machine)
ORDERS = 150
MAX_EVENTS_PER_BATCH = 250
# generous: the daemon evaluates a backfill every 30 s, and runs queue for the run slots
BACKFILL_TIMEOUT_S = 600
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}

SENSORS = """
query {
  repositoriesOrError {
    ... on RepositoryConnection { nodes { sensors { name sensorState { id status } } } }
  }
}
"""
STOP_SENSOR = """
mutation($id: String!) {
  stopSensor(id: $id) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
  }
}
"""
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""
BACKFILL = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status numPartitions runs { runId status } }
    ... on PythonError { message }
  }
}
"""


def graphql(base: str, query: str, **variables) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        body = json.loads(resp.read())
    assert not body.get("errors"), body["errors"]
    return body["data"]


def stop_sensor(base: str, name: str) -> None:
    repos = graphql(base, SENSORS)["repositoriesOrError"]["nodes"]
    (state_id,) = [s["sensorState"]["id"] for r in repos for s in r["sensors"] if s["name"] == name]
    result = graphql(base, STOP_SENSOR, id=state_id)["stopSensor"]
    assert result.get("instigationState", {}).get("status") == "STOPPED", result


def backfill(base: str, keys: list[str], title: str) -> str:
    """Launch a backfill of `keys` of raw_order_events as the UI does; its id."""
    params = {
        "assetSelection": [{"path": list(ASSET.path)}],
        "partitionNames": keys,
        "fromFailure": False,
        "title": title,
    }
    result = graphql(base, LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def finished_backfill(base: str, backfill_id: str) -> dict | None:
    found = graphql(base, BACKFILL, id=backfill_id)["partitionBackfillOrError"]
    assert found["__typename"] == "PartitionBackfill", found
    return found if found["status"] in DONE else None


def rows_landed_by_run(instance: DagsterInstance) -> dict[str, int]:
    """run id -> rows that run's materialization of raw_order_events reported landing."""
    records = instance.fetch_materializations(ASSET, limit=1000).records
    return {
        r.run_id: r.asset_materialization.metadata["rows_landed"].value
        for r in records
        if r.asset_materialization is not None
    }


@pytest.mark.slow
@pytest.mark.faults
def test_a_backfill_of_landed_partitions_from_the_ui_twice_leaves_the_tables_byte_identical(
    topic, tmp_path, fault_report, dagster_testbed
):
    bed = dagster_testbed(
        orders=ORDERS,
        group_prefix="orderflow-backfill",
        extra={"ORDERFLOW_MAX_EVENTS_PER_BATCH": str(MAX_EVENTS_PER_BATCH)},
    )
    outgoing, env, conn = bed.outgoing, bed.env, bed.conn
    consumer, instance = bed.consumer, bed.instance
    # landed by the asset in runs of the instance the UI shows, one partition per range
    cli("catch-up", "--no-dbt", env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    keys = [key for key, *_ in ledger(conn, topic)]
    assert sorted(instance.get_dynamic_partitions(offset_ranges.name)) == sorted(keys)
    assert len(keys) >= 4, keys
    before = table_checksums(conn, topic)
    after: list[dict] = []
    backfill_runs: list[list[dict]] = []
    with dagster_webserver(env, tmp_path / "logs", port) as web:
        wait_for_http(f"{base}/server_info", web)
        # the marts are not under test; a dbt build would only compete for the run slots
        stop_sensor(base, "dbt_after_landing_sensor")
        with dagster_daemon(env, tmp_path / "logs") as daemon:
            recovery = time.monotonic()
            for attempt in (1, 2):
                backfill_id = backfill(base, keys, f"re-land every range, {attempt} of 2")
                done = wait_until(
                    lambda backfill_id=backfill_id: finished_backfill(base, backfill_id),
                    timeout_s=BACKFILL_TIMEOUT_S,
                    interval_s=2.0,
                    what=f"backfill {backfill_id} of {len(keys)} partitions",
                    watch=[web, daemon],
                    describe=lambda: run_summary(instance),
                )
                assert done["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, done
                backfill_runs.append(done["runs"])
                after.append(table_checksums(conn, topic))
            inv = invariants(conn, consumer, topic, len(outgoing))
            recovery_s = time.monotonic() - recovery
    fault_report.record_invariants(
        "7. backfill of landed partitions via the UI API", inv, recovery_s=recovery_s
    )
    landed_rows = rows_landed_by_run(instance)
    for runs in backfill_runs:
        assert {r["status"] for r in runs} == {"SUCCESS"}, runs
        launched = instance.get_runs(filters=RunsFilter(run_ids=[r["runId"] for r in runs]))
        # one run per landed range, each of which found every record already there
        assert sorted(r.tags[PARTITION_TAG] for r in launched) == sorted(keys)
        assert all(landed_rows[r["runId"]] == 0 for r in runs), landed_rows
    assert after == [before, before]
    inv.assert_exactly_once()
