"""Session fixtures: a real Kafka broker and a real PostgreSQL, started by the project's own stack
manager in `.orderflow-test/` on test ports, so tests never touch the demo stack."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderflow_dagster.stack import manager
from tests import fault_report as fault_table
from tests.support import scratch_database

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = Path(os.environ.get("ORDERFLOW_TEST_HOME", REPO / ".orderflow-test"))


@pytest.fixture(scope="session")
def stack() -> Iterator[manager.StackInfo]:
    cfg = manager.StackConfig(
        home=TEST_HOME,
        kafka_port=int(os.environ.get("ORDERFLOW_TEST_KAFKA_PORT", "29092")),
        postgres_port=int(os.environ.get("ORDERFLOW_TEST_POSTGRES_PORT", "25432")),
        # the jar cache is shared with the demo stack so Maven resolves it once per machine
        kafka_libs=REPO / ".orderflow" / "kafka" / "libs",
    )
    info = manager.start(cfg)
    yield info
    if not os.environ.get("ORDERFLOW_TEST_KEEP_STACK"):
        manager.stop(cfg)


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: manager.StackInfo) -> str:
    return stack.bootstrap_servers


@pytest.fixture(scope="session")
def stack_dsn(stack: manager.StackInfo) -> str:
    return stack.dsn


@pytest.fixture
def postgres_dsn(stack_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    with scratch_database(stack_dsn) as dsn:
        yield dsn


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A fresh 4-partition topic for one test."""
    name = f"orders.events.test-{uuid.uuid4().hex[:10]}"
    manager.ensure_topics(kafka_bootstrap, {name: 4})
    return name


@pytest.fixture(scope="session")
def fault_report() -> fault_table.FaultReport:
    """The fault suite's summary table; fault tests add one trial each (tests/fault_report.py)."""
    return fault_table.REPORT


def pytest_terminal_summary(terminalreporter) -> None:
    if fault_table.REPORT.trials:
        terminalreporter.write_sep("=", "fault suite: lost and duplicated records per scenario")
        terminalreporter.write_line(fault_table.REPORT.text())


def pytest_sessionfinish(session, exitstatus) -> None:
    report = fault_table.REPORT
    if not report.trials:
        return
    caption = f"Latest run: {fault_table.machine()}, pytest exit status {int(exitstatus)}."
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    (TEST_HOME / "fault-report.md").write_text(f"{caption}\n\n{report.markdown()}")
    if os.environ.get("ORDERFLOW_WRITE_FAULT_TABLE"):
        fault_table.splice(REPO / "docs" / "reliability.md", report.markdown(), caption)


@pytest.fixture
def dagster_testbed(kafka_bootstrap, postgres_dsn, topic, tmp_path):
    """A factory of `tests.dagster_processes.Testbed` on this test's topic and database, closed
    after the test: `dagster_testbed(orders=300, group_prefix="e2e", extra={...})`."""
    from tests.dagster_processes import open_testbed

    opened = []

    def make(*, orders: int, group_prefix: str, extra: dict[str, str]):
        bed = open_testbed(
            tmp_path,
            bootstrap_servers=kafka_bootstrap,
            dsn=postgres_dsn,
            topic=topic,
            orders=orders,
            group_prefix=group_prefix,
            extra=extra,
        )
        opened.append(bed)
        return bed

    yield make
    for bed in opened:
        bed.close()


@pytest.fixture
def cli_env(kafka_bootstrap, postgres_dsn, topic, tmp_path):
    """A factory of the environment an `orderflow` subprocess of this test runs with: the test's
    services, topic and database, its own consumer group and DAGSTER_HOME."""

    def make(*, group: str, max_events_per_batch: int, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "ORDERFLOW_POSTGRES_DSN": postgres_dsn,
            "ORDERFLOW_TOPIC": topic,
            "ORDERFLOW_CONSUMER_GROUP": group,
            "ORDERFLOW_MAX_EVENTS_PER_BATCH": str(max_events_per_batch),
            "DAGSTER_HOME": str(tmp_path),
            **extra,
        }

    return make
