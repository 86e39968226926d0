"""Which ranges get a run: pure unit tests of the sensor's launch rules."""

from orderflow_dagster.defs.launch import Launch, RunInfo, launches


def test_a_range_without_runs_is_launched_with_its_key_as_run_key():
    assert launches(["k1"], {}, now=100.0, retry_grace_seconds=30) == [Launch("k1", "k1")]


def test_a_range_with_a_run_in_flight_is_not_launched_again():
    runs = {"k1": [RunInfo("STARTED", None)], "k2": [RunInfo("QUEUED", None)]}
    assert launches(["k1", "k2"], runs, now=100.0, retry_grace_seconds=30) == []


def test_a_failed_range_is_relaunched_with_a_new_run_key_after_the_grace_period():
    runs = {"k1": [RunInfo("FAILURE", 50.0)]}
    assert launches(["k1"], runs, now=60.0, retry_grace_seconds=30) == []
    assert launches(["k1"], runs, now=90.0, retry_grace_seconds=30) == [
        Launch("k1", "k1|attempt-2")
    ]


def test_each_retry_of_a_failed_range_gets_a_distinct_run_key():
    runs = {"k1": [RunInfo("FAILURE", 1.0), RunInfo("CANCELED", 2.0)]}
    (launch,) = launches(["k1"], runs, now=100.0, retry_grace_seconds=0)
    assert launch.run_key == "k1|attempt-3"


def test_dbt_builds_once_for_a_burst_of_landed_ranges_and_never_concurrently():
    from orderflow_dagster.defs.launch import dbt_build_decision

    assert dbt_build_decision(0, "0:-", None, dbt_in_progress=False) == "nothing landed yet"
    assert dbt_build_decision(5, "5:t1", None, dbt_in_progress=False) is None
    assert dbt_build_decision(5, "5:t1", "5:t1", dbt_in_progress=False) == (
        "nothing landed or replayed since the last dbt build"
    )
    assert "in progress" in dbt_build_decision(9, "9:t2", "5:t1", dbt_in_progress=True)
    assert dbt_build_decision(9, "9:t2", "5:t1", dbt_in_progress=False) is None


def test_dbt_heartbeat_builds_only_after_its_interval_and_never_when_turned_off():
    from orderflow_dagster.defs.launch import heartbeat_due

    assert not heartbeat_due(None, now=1_000.0, heartbeat_seconds=300)
    assert not heartbeat_due(800.0, now=1_000.0, heartbeat_seconds=300)
    assert heartbeat_due(700.0, now=1_000.0, heartbeat_seconds=300)
    assert not heartbeat_due(0.0, now=1_000.0, heartbeat_seconds=0)
