"""orders.status under faults: a publisher SIGKILLed at each crash point, two publishers at once.
Each rerun leaves the stream folding to order_status_history with no changelog row twice."""

from __future__ import annotations

import signal
import time

import pytest
from confluent_kafka import Producer

from orderflow_dagster.faults import PUBLISH_CRASH_POINTS
from orderflow_dagster.ingest.errors import ProducerFencedError
from orderflow_dagster.land import session
from orderflow_dagster.publish import changelog
from orderflow_dagster.publish.producer import _call, transactional_producer
from tests.status_stream import assert_exact, history, read_stream, stream_faults
from tests.support import orderflow, produce_orders
from tests.test_publish import fresh_topics, stream_env

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("point", PUBLISH_CRASH_POINTS)
def test_a_publisher_killed_at_any_point_loses_and_repeats_nothing_after_a_rerun(
    kafka_bootstrap, postgres_dsn, tmp_path, fault_report, point
):
    events_topic, status_topic = fresh_topics(kafka_bootstrap)
    produce_orders(kafka_bootstrap, events_topic, 80, seed=3)
    # small transactions, so a kill leaves some committed and the rest to publish
    env = stream_env(kafka_bootstrap, postgres_dsn, events_topic, status_topic, tmp_path) | {
        "ORDERFLOW_PUBLISH_BATCH_SIZE": "40"
    }
    killed = orderflow("catch-up", env=env | {"ORDERFLOW_CRASH_AT": point}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = read_stream(kafka_bootstrap, status_topic)
    if point == "publish_after_commit":
        assert len(before) == 40
    else:
        assert before == []
    started = time.monotonic()
    orderflow("catch-up", env=env)
    recovery = time.monotonic() - started
    messages, expected = read_stream(kafka_bootstrap, status_topic), history(postgres_dsn)
    lost, duplicated = stream_faults(messages, expected)
    fault_report.record(
        f"18. publisher SIGKILL at {point}",
        messages=len(expected),
        lost=lost,
        duplicated=duplicated,
        recovery_s=recovery,
    )
    assert_exact(messages, expected)


def test_a_second_publisher_fences_the_first_and_the_stream_stays_exact(
    kafka_bootstrap, postgres_dsn, tmp_path, fault_report
):
    events_topic, status_topic = fresh_topics(kafka_bootstrap)
    produce_orders(kafka_bootstrap, events_topic, 40, seed=5)
    env = stream_env(kafka_bootstrap, postgres_dsn, events_topic, status_topic, tmp_path)
    orderflow("catch-up", "--no-dbt", env=env)
    from orderflow_dagster.transform.dbt import run_dbt_build

    run_dbt_build(postgres_dsn)
    transactional_id = env["ORDERFLOW_PUBLISH_TRANSACTIONAL_ID"]
    conn = session.connect(postgres_dsn)
    try:
        changelog.record_changes(conn, "analytics")
        zombie: Producer = transactional_producer(kafka_bootstrap, transactional_id)
        zombie.begin_transaction()
        zombie.produce(status_topic, value=b'{"changelog_seq": 1}', key=b"zombie")
        zombie.flush(10)
        # the newer publisher takes the transactional.id: the zombie's transaction is aborted
        started = time.monotonic()
        orderflow("catch-up", env=env)
        with pytest.raises(ProducerFencedError):
            _call(zombie.commit_transaction, 30)
    finally:
        conn.close()
    messages, expected = read_stream(kafka_bootstrap, status_topic), history(postgres_dsn)
    lost, duplicated = stream_faults(messages, expected)
    fault_report.record(
        "19. two publishers at once",
        messages=len(expected),
        lost=lost,
        duplicated=duplicated,
        recovery_s=time.monotonic() - started,
    )
    assert_exact(messages, expected)
