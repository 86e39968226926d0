"""The publish asset in Dagster: materialized after the dbt build, in the same run, with its lag
as metadata and as the `publish_lag` check."""

from __future__ import annotations

from dagster import AssetKey, DagsterInstance

from tests.status_stream import assert_exact, history, read_stream
from tests.support import orderflow, produce_orders
from tests.test_publish import fresh_topics, stream_env

PUBLISH = AssetKey(["orders_status_topic"])


def test_the_publish_asset_runs_after_the_dbt_build_and_reports_its_lag(
    kafka_bootstrap, postgres_dsn, tmp_path, monkeypatch
):
    events_topic, status_topic = fresh_topics(kafka_bootstrap)
    produce_orders(kafka_bootstrap, events_topic, 30, seed=11)
    env = stream_env(kafka_bootstrap, postgres_dsn, events_topic, status_topic, tmp_path)
    orderflow("catch-up", "--no-dbt", env=env)
    for name in (
        "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS",
        "ORDERFLOW_POSTGRES_DSN",
        "ORDERFLOW_TOPIC",
        "ORDERFLOW_STATUS_TOPIC",
        "ORDERFLOW_PUBLISH_TRANSACTIONAL_ID",
        "ORDERFLOW_CONSUMER_GROUP",
    ):
        monkeypatch.setenv(name, env[name])
    # a threshold every real lag exceeds only when something was left unpublished
    monkeypatch.setenv("ORDERFLOW_MAX_PUBLISH_LAG", "0")
    from orderflow_dagster.definitions import defs

    job = defs.resolve_job_def("orderflow_dbt_job")
    result = job.execute_in_process(instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success
    keys = [e.asset_key for e in result.get_asset_materialization_events()]
    assert keys[-1] == PUBLISH, keys
    assert AssetKey(["order_status_history"]) in keys[:-1]
    (published,) = [e for e in result.get_asset_materialization_events() if e.asset_key == PUBLISH]
    metadata = published.materialization.metadata
    assert metadata["lag"].value == 0
    assert metadata["messages_published"].value == len(history(postgres_dsn)) > 0
    (check,) = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        if e.event_specific_data.asset_key == PUBLISH
    ]
    assert check.check_name == "publish_lag" and check.passed
    assert_exact(read_stream(kafka_bootstrap, status_topic), history(postgres_dsn))


def test_the_publish_lag_check_fails_above_its_threshold(
    kafka_bootstrap, postgres_dsn, tmp_path, monkeypatch
):
    from orderflow_dagster.publish import changelog
    from orderflow_dagster.publish.run import max_lag

    monkeypatch.setenv("ORDERFLOW_MAX_PUBLISH_LAG", "2")
    assert max_lag() == 2
    events_topic, status_topic = fresh_topics(kafka_bootstrap)
    produce_orders(kafka_bootstrap, events_topic, 10, seed=2)
    env = stream_env(kafka_bootstrap, postgres_dsn, events_topic, status_topic, tmp_path)
    orderflow("catch-up", "--no-dbt", env=env)
    from orderflow_dagster.land import session
    from orderflow_dagster.transform.dbt import run_dbt_build

    run_dbt_build(postgres_dsn)
    conn = session.connect(postgres_dsn)
    try:
        changelog.record_changes(conn, "analytics")
        lag = changelog.unpublished(conn, 0)
    finally:
        conn.close()
    from orderflow_dagster.defs.publish import lag_check

    assert lag > 2
    assert not lag_check(lag, max_lag()).passed
    assert lag_check(0, max_lag()).passed
