"""The broker killed and restarted while the status publisher is halfway through a transaction:
the publish finishes after the restart, and the stream is exact. On the fault stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.status_stream import assert_exact, history, read_stream, stream_faults
from tests.support import produce_orders, scratch_database, wait_for_leaders
from tests.test_infra_faults import faulty_stack  # noqa: F401  (the fixture)
from tests.test_publish import fresh_topics, stream_env

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_a_broker_restart_mid_publish_neither_loses_nor_repeats_a_status_change(
    faulty_stack,  # noqa: F811
    tmp_path,
    fault_report,
):
    cfg, info = faulty_stack
    events_topic, status_topic = fresh_topics(info.bootstrap_servers)
    produce_orders(info.bootstrap_servers, events_topic, 60, seed=9)
    flag = tmp_path / f"pause-{uuid.uuid4().hex}"
    with scratch_database(info.dsn) as dsn:
        env = stream_env(info.bootstrap_servers, dsn, events_topic, status_topic, tmp_path) | {
            "ORDERFLOW_PUBLISH_BATCH_SIZE": "50",
            "ORDERFLOW_PAUSE_AT": f"publish_mid_transaction:{flag}",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "orderflow_dagster.cli", "catch-up"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the publisher never reached mid-transaction"
            time.sleep(0.1)
        cfg.kafka_broker().kill()
        flag.unlink()  # the publisher carries on against a dead broker
        time.sleep(3)
        started = time.monotonic()
        cfg.kafka_broker().start()
        wait_for_leaders(info.bootstrap_servers, status_topic)
        out, err = proc.communicate(timeout=400)
        recovery = time.monotonic() - started
        assert proc.returncode == 0, out + err
        messages, expected = read_stream(info.bootstrap_servers, status_topic), history(dsn)
    lost, duplicated = stream_faults(messages, expected)
    fault_report.record(
        "20. broker restart mid-publish",
        messages=len(expected),
        lost=lost,
        duplicated=duplicated,
        recovery_s=recovery,
    )
    assert_exact(messages, expected)
