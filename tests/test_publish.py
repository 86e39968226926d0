"""orders.status: the published stream, read_committed and folded, is order_status_history."""

from __future__ import annotations

import random
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderflow_dagster.ingest.generator import generate
from orderflow_dagster.stack import manager
from tests.status_stream import assert_exact, history, read_stream
from tests.support import orderflow, produce, scratch_database


def split_late(outgoing: list, held_share: float, seed: int) -> tuple[list, list]:
    """The stream without a random share of its events, and those events, sent later."""
    rng = random.Random(seed)
    first, late = [], []
    for msg in outgoing:
        (late if msg.event is not None and rng.random() < held_share else first).append(msg)
    return first, late


def stream_env(bootstrap: str, dsn: str, events_topic: str, status_topic: str, home) -> dict:
    import os

    return {
        **os.environ,
        "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "ORDERFLOW_POSTGRES_DSN": dsn,
        "ORDERFLOW_TOPIC": events_topic,
        "ORDERFLOW_STATUS_TOPIC": status_topic,
        "ORDERFLOW_PUBLISH_TRANSACTIONAL_ID": f"publisher-{status_topic}",
        "ORDERFLOW_CONSUMER_GROUP": f"group-{events_topic}",
        "DAGSTER_HOME": str(home),
    }


def fresh_topics(bootstrap: str) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    events, status = f"orders.events.test-{suffix}", f"orders.status.test-{suffix}"
    manager.ensure_topics(bootstrap, {events: 4, status: 4})
    return events, status


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**16),
    held_share=st.sampled_from([0.0, 0.2, 0.5]),
    orders=st.integers(5, 60),
)
def test_published_stream_folds_to_the_history_through_late_events(
    kafka_bootstrap, stack_dsn, tmp_path_factory, seed, held_share, orders
):
    events_topic, status_topic = fresh_topics(kafka_bootstrap)
    outgoing = list(generate(orders, seed=seed, num_partitions=4, poison_rate=0.0))
    first, late = split_late(outgoing, held_share, seed)
    with scratch_database(stack_dsn) as dsn:
        env = stream_env(
            kafka_bootstrap, dsn, events_topic, status_topic, tmp_path_factory.mktemp("home")
        )
        produce(kafka_bootstrap, events_topic, first)
        orderflow("catch-up", env=env)
        assert_exact(read_stream(kafka_bootstrap, status_topic), history(dsn))
        produce(kafka_bootstrap, events_topic, late)
        orderflow("catch-up", env=env)
        messages = read_stream(kafka_bootstrap, status_topic)
        assert_exact(messages, history(dsn))
        # nothing changed: a further catch-up publishes nothing
        orderflow("catch-up", env=env)
        assert read_stream(kafka_bootstrap, status_topic) == messages


def test_late_events_that_renumber_an_order_are_published_as_corrections(
    kafka_bootstrap, postgres_dsn, tmp_path
):
    events_topic, status_topic = fresh_topics(kafka_bootstrap)
    outgoing = list(generate(20, seed=7, num_partitions=4, poison_rate=0.0, duplicate_rate=0.0))
    # each order's first event arrives last: every transition after it moves up one number
    firsts: dict[bytes, object] = {}
    for msg in outgoing:
        if msg.event is not None:
            best = firsts.get(msg.key)
            if best is None or msg.event["timestamp"] < best.event["timestamp"]:
                firsts[msg.key] = msg
    held = {id(m) for m in firsts.values()}
    env = stream_env(kafka_bootstrap, postgres_dsn, events_topic, status_topic, tmp_path)
    produce(kafka_bootstrap, events_topic, [m for m in outgoing if id(m) not in held])
    orderflow("catch-up", env=env)
    produce(kafka_bootstrap, events_topic, list(firsts.values()))
    orderflow("catch-up", env=env)
    messages = read_stream(kafka_bootstrap, status_topic)
    assert {m["kind"] for m in messages} >= {"transition", "correction"}
    assert_exact(messages, history(postgres_dsn))
